"""Clusters in this process: ``local`` (CPU workers) and ``local-cuda`` (one per GPU)."""

from __future__ import annotations

import os

import dask.config

from ..scaling import initial_workers, start_adapting
from ..schema import COUNT, MEMORY_LIMIT, STRING
from ..tls import security, tls_text
from .base import Backend, indent, require, yaml_text


class Local(Backend):
    name = "local"
    section = "local"
    options = {
        "threads_per_worker": COUNT,
        "memory_limit": MEMORY_LIMIT,
        "host": STRING,
        "dashboard_address": STRING,
    }

    def option_values(self, spec):
        options = super().option_values(spec)
        if "host" in options:  # the dashboard listens beside the scheduler
            options.setdefault("dashboard_address", f"{options['host']}:0")
        return options

    def start(self, spec):
        from ..embedded import embedded_cluster

        cluster = embedded_cluster(initial_workers(spec), security=security(spec),
                                   **self.option_values(spec))
        start_adapting(spec, cluster)
        return cluster

    def resolved_options(self, spec) -> dict:
        """The options :func:`~daskdist.clusters.embedded.embedded_cluster` will use."""
        host = dask.config.get("daskdist.cluster.host")
        n_workers = (initial_workers(spec) or dask.config.get("daskdist.cluster.n-workers")
                     or os.cpu_count() or 1)
        return {
            "n_workers": n_workers,
            "threads_per_worker": dask.config.get("daskdist.cluster.threads-per-worker"),
            "processes": True,
            "host": host,
            "dashboard_address": f"{host}:0",
            **self.option_values(spec),
        }

    def expected_workers(self, spec, cluster):
        if cluster is None and spec.data.get("adapt") is None:
            return self.resolved_options(spec)["n_workers"]
        return super().expected_workers(spec, cluster)

    def describe(self, spec):
        from ..embedded import embedded_cluster_config

        return ("# distributed.LocalCluster in this process "
                "(daskdist.clusters.embedded.embedded_cluster)\n"
                + yaml_text({**self.resolved_options(spec), "security": tls_text(spec)})
                + "# Dask settings while the workers start (daskdist.cluster.dask-config):\n"
                + indent(yaml_text(embedded_cluster_config()), "#   "))

    def fixed_text(self, spec):
        return (f"fixed, {self.resolved_options(spec)['n_workers']} worker(s) "
                f"(workers: null, so daskdist.cluster.n-workers, else one per core)")


class LocalCUDA(Backend):
    name = "local-cuda"
    section = "cuda"
    options = {
        "devices": {"type": ["string", "array"], "items": {"type": ["integer", "string"]},
                    "expected": "GPUs such as '0,1' or [0, 1]"},
        "threads_per_worker": COUNT,
        "memory_limit": MEMORY_LIMIT,
        "device_memory_limit": {"type": ["string", "number"],
                                "expected": "a size such as '30GB' or a fraction such as 0.8"},
        "rmm_pool_size": {"type": ["string", "number"],
                          "expected": "a size such as '24GB' or a fraction such as 0.9"},
        "protocol": {"type": "string", "enum": ["tcp", "ucx"], "expected": "'tcp' or 'ucx'"},
        "local_directory": STRING,
        "dashboard_address": STRING,
    }
    scaling = "fixed-only"
    package = ("dask_cuda", "dask-cuda", "cuda")

    def cluster_options(self, spec) -> dict:
        options = self.option_values(spec)
        host = dask.config.get("daskdist.cluster.host")
        if "devices" in options:
            devices = options.pop("devices")
            options["CUDA_VISIBLE_DEVICES"] = (devices if isinstance(devices, str)
                                               else ",".join(map(str, devices)))
        return {
            "n_workers": spec.data.get("workers"),
            "threads_per_worker": dask.config.get("daskdist.cluster.threads-per-worker"),
            "host": host,
            "dashboard_address": f"{host}:0",
            **options,
        }

    def start(self, spec):
        from ..embedded import embedded_cluster_config, temporary_security

        dask_cuda = require(spec, self, *self.package)
        tls = security(spec)
        if tls is None:
            tls = bool(dask.config.get("daskdist.cluster.tls"))
        if tls is True:
            tls = temporary_security()
        with dask.config.set(embedded_cluster_config()):
            return dask_cuda.LocalCUDACluster(security=tls or None,
                                              **self.cluster_options(spec))

    def describe(self, spec):
        return ("# dask_cuda.LocalCUDACluster in this process, one worker per GPU\n"
                + yaml_text({**self.cluster_options(spec), "security": tls_text(spec)}))

    def fixed_text(self, spec):
        return "one worker per visible GPU"
