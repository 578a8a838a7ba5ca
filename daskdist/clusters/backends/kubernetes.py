"""``kubernetes``: a cluster made by the Dask Kubernetes operator."""

from __future__ import annotations

from ..scaling import initial_workers, start_adapting
from ..schema import BOOL, COUNT, MAPPING, STRING
from .base import Backend, require, yaml_text


class Kubernetes(Backend):
    name = "kubernetes"
    section = "kubernetes"
    options = {
        "name": STRING,
        "namespace": STRING,
        "image": STRING,
        "resources": {"type": "object", "expected": "a mapping with requests and limits",
                      "properties": {"requests": MAPPING, "limits": MAPPING},
                      "additionalProperties": False},
        "env": {"type": "object", "additionalProperties": STRING,
                "expected": "a mapping of variable names to strings"},
        "worker_command": {"type": ["string", "array"], "items": STRING,
                           "expected": "a command as a string or a list of strings"},
        "scheduler_service_type": {"type": "string",
                                   "enum": ["ClusterIP", "NodePort", "LoadBalancer"],
                                   "expected": "'ClusterIP', 'NodePort' or 'LoadBalancer'"},
        "idle_timeout": {"type": "integer", "minimum": 0,
                         "expected": "a number of seconds (0: never)"},
        "resource_timeout": COUNT,
        "port_forward_cluster_ip": BOOL,
        "shutdown_on_close": BOOL,
    }
    required = ("image",)
    scaling = "required"
    tls = None
    package = ("dask_kubernetes.operator", "dask-kubernetes", "kubernetes")

    def cluster_name(self, spec) -> str:
        return self.option_values(spec).get("name", "daskdist")

    def start(self, spec):
        operator = require(spec, self, *self.package)
        options = {"name": self.cluster_name(spec), **self.option_values(spec)}
        cluster = operator.KubeCluster(n_workers=initial_workers(spec), **options)
        start_adapting(spec, cluster)
        return cluster

    def describe(self, spec):
        operator = require(spec, self, *self.package)
        options = self.option_values(spec)
        name = self.cluster_name(spec)
        keys = ("image", "resources", "env", "worker_command", "scheduler_service_type",
                "idle_timeout")
        resource = operator.make_cluster_spec(
            name, n_workers=initial_workers(spec), **{k: options[k] for k in keys
                                                      if k in options})
        if "namespace" in options:
            resource["metadata"]["namespace"] = options["namespace"]
        documents = [resource]
        adapt = spec.data.get("adapt")
        if adapt is not None:
            documents.append({"apiVersion": "kubernetes.dask.org/v1", "kind": "DaskAutoscaler",
                              "metadata": {"name": name},
                              "spec": {"cluster": name, "minimum": adapt["minimum"],
                                       "maximum": adapt["maximum"]}})
        return ("# resources created through the Dask Kubernetes operator "
                "(dask_kubernetes.operator.KubeCluster):\n"
                + "---\n".join(yaml_text(document) for document in documents))

    def hint(self, spec, cluster=None):
        return (f" (see kubectl get pods -l dask.org/cluster-name={self.cluster_name(spec)}; "
                f"is the Dask operator installed?)")
