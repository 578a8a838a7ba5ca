"""``slurm`` and ``pbs`` through dask-jobqueue: a local scheduler, workers in batch jobs."""

from __future__ import annotations

import importlib
import os
import subprocess
import tempfile

from ..scaling import initial_workers, start_adapting
from ..schema import BOOL, COUNT, MAPPING, SIZE, STRING, STRINGS
from ..tls import security
from .base import SCHEDULER_PLACEHOLDER, Backend, indent, require, yaml_text


class JobQueue(Backend):
    """What SLURM and PBS share; each names its cluster and job classes."""

    section = "jobqueue"
    options = {
        "cores": COUNT,
        "memory": SIZE,
        "processes": COUNT,
        "queue": STRING,
        "account": STRING,
        "walltime": {**STRING, "expected": "a string such as '01:00:00'"},
        "job_name": STRING,
        "job_extra_directives": STRINGS,
        "job_directives_skip": STRINGS,
        "job_script_prologue": STRINGS,
        "worker_extra_args": STRINGS,
        "interface": STRING,
        "local_directory": STRING,
        "log_directory": STRING,
        "shared_temp_directory": STRING,
        "python": STRING,
        "shebang": STRING,
        "death_timeout": {"type": "number", "expected": "a number of seconds"},
        "nanny": BOOL,
        "scheduler_options": MAPPING,
    }
    required = ("cores", "memory")
    scaling = "required"
    package = ("dask_jobqueue", "dask-jobqueue", "jobqueue")
    cluster_class = ""  # in dask_jobqueue
    job_class = ""  # module.name
    queue_command = ""

    def start(self, spec):
        dask_jobqueue = require(spec, self, *self.package)
        cluster_cls = getattr(dask_jobqueue, self.cluster_class)
        cluster = cluster_cls(n_workers=initial_workers(spec), security=security(spec) or None,
                              **self.option_values(spec))
        start_adapting(spec, cluster)
        return cluster

    def describe(self, spec):
        require(spec, self, *self.package)
        module, _, name = self.job_class.rpartition(".")
        job_cls = getattr(importlib.import_module(module), name)
        options = self.option_values(spec)
        cluster_only = {key: options.pop(key, None) for key in ("scheduler_options",
                                                                "shared_temp_directory")}
        cluster_only = {key: value for key, value in cluster_only.items() if value}
        tls = spec.data.get("tls")
        protocol = "tls" if tls else "tcp"
        if isinstance(tls, dict):
            options["security"] = security(spec, check=False)
        if tls:
            options["protocol"] = "tls://"
        logs = options.get("log_directory")
        with tempfile.TemporaryDirectory() as scratch:
            if logs is not None and not os.path.isdir(logs):
                # dask-jobqueue makes the folder: render with a scratch one, then name the real
                options["log_directory"] = scratch
            script = job_cls(f"{protocol}://{SCHEDULER_PLACEHOLDER}:8786", name="{worker-name}",
                             **options).job_script()
            if options.get("log_directory") == scratch:
                script = script.replace(scratch, logs.rstrip("/"))
        lines = [f"# dask_jobqueue.{self.cluster_class}: the scheduler runs in this process, "
                 f"each worker batch job runs this script (submitted with "
                 f"{job_cls.submit_command}):"]
        if tls is True:
            lines.append("# (temporary TLS certificates are added to the worker command "
                         "when the cluster starts)")
        if cluster_only:
            lines.append(indent(yaml_text(cluster_only), "# ").rstrip())
        return "\n".join(lines) + "\n" + script

    def hint(self, spec, cluster=None):
        states = self.job_states(_job_ids(cluster))
        if states:
            return f" ({states})"
        return f" (are the jobs still queued? see {self.queue_command})"

    def job_states(self, job_ids: list[str]) -> str:
        """What the queue says of the cluster's jobs, as text ('' when it cannot tell)."""
        return ""


def _job_ids(cluster) -> list[str]:
    """The batch job ids of a dask-jobqueue cluster's workers (submitted ones only)."""
    jobs = getattr(cluster, "workers", None) or {}
    return [str(job.job_id) for job in jobs.values() if getattr(job, "job_id", None)]


class Slurm(JobQueue):
    name = "slurm"
    options = {**JobQueue.options,
               "job_cpu": COUNT,
               "job_mem": {**STRING, "expected": "a size in Slurm's units such as '16G'"}}
    cluster_class = "SLURMCluster"
    job_class = "dask_jobqueue.slurm.SLURMJob"
    queue_command = "squeue --me"

    def job_states(self, job_ids):
        if not job_ids:
            return ""
        try:
            done = subprocess.run(["squeue", "-h", "-j", ",".join(job_ids), "-o", "%i %T %r"],
                                  capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            return ""
        listed = {}
        for line in done.stdout.splitlines():
            job, state, *reason = line.split(None, 2)
            reason = reason[0] if reason and reason[0] != "None" else ""
            listed[job] = state + (f", reason {reason}" if reason else "")
        parts = [f"job {job}: {listed.get(job, 'no longer queued (cancelled, failed or ended)')}"
                 for job in job_ids]
        return "; ".join(parts)


class PBS(JobQueue):
    name = "pbs"
    options = {**JobQueue.options,
               "resource_spec": {**STRING, "expected": "a string such as "
                                                       "'select=1:ncpus=4:mem=16GB'"}}
    cluster_class = "PBSCluster"
    job_class = "dask_jobqueue.pbs.PBSJob"
    queue_command = "qstat -u $USER"
