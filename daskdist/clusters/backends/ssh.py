"""``ssh``: a scheduler and workers started over SSH on named hosts."""

from __future__ import annotations

import json
import sys

import dask.config

from ..schema import MAPPING, STRING
from .base import SCHEDULER_PLACEHOLDER, Backend


class SSH(Backend):
    name = "ssh"
    section = "ssh"
    options = {
        "hosts": {"type": "array", "items": STRING, "minItems": 2,
                  "expected": "a list of at least two host names (the scheduler's first)"},
        "connect_options": MAPPING,
        "worker_options": MAPPING,
        "scheduler_options": MAPPING,
        "worker_class": STRING,
        "remote_python": STRING,
    }
    required = ("hosts",)
    scaling = None
    tls = None
    package = ("asyncssh", "asyncssh", "ssh")

    def start(self, spec):
        from distributed.deploy.ssh import SSHCluster

        from ..embedded import embedded_cluster_config

        # SSHCluster hands this process's Dask settings to the remote processes.
        with dask.config.set(embedded_cluster_config()):
            return SSHCluster(**self.option_values(spec))

    def per_host(self, spec) -> int:
        return (spec.data["ssh"].get("worker_options") or {}).get("n_workers", 1)

    def expected_workers(self, spec, cluster):
        return (len(spec.data["ssh"]["hosts"]) - 1) * self.per_host(spec)

    def describe(self, spec):
        options = self.option_values(spec)
        python = options.get("remote_python", sys.executable)
        scheduler_spec = {"cls": "distributed.Scheduler",
                          "opts": options.get("scheduler_options", {})}
        worker_options = dict(options.get("worker_options", {}))
        n_workers = worker_options.pop("n_workers", 1)
        worker_spec = {i: {"cls": options.get("worker_class", "distributed.Nanny"),
                           "opts": worker_options} for i in range(n_workers)}
        hosts = options["hosts"]
        lines = ["# distributed.deploy.ssh.SSHCluster: over SSH "
                 f"(connect_options: {json.dumps(options.get('connect_options', {}))})",
                 f"# scheduler on {hosts[0]}:",
                 f"{python} -m distributed.cli.dask_spec --spec '{json.dumps(scheduler_spec)}'"]
        for host in hosts[1:]:
            lines += [f"# {n_workers} worker(s) on {host}:",
                      f"{python} -m distributed.cli.dask_spec {SCHEDULER_PLACEHOLDER} "
                      f"--spec '{json.dumps(worker_spec)}'"]
        return "\n".join(lines)

    def fixed_text(self, spec):
        hosts = len(spec.data["ssh"]["hosts"]) - 1
        return f"fixed, {self.per_host(spec)} worker(s) on each of {hosts} host(s)"

    def hint(self, spec, cluster=None):
        return " (check that the worker hosts reach the scheduler's host)"
