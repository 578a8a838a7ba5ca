"""Helpers for testing code that uses daskdist: small modules and data.

Modules defined here are importable on every worker, so tests can ship them
to real worker processes by reference.
"""

from __future__ import annotations

import os
import re
import signal

import numpy as np
import torch
from distributed import WorkerPlugin

__all__ = ["TinyNet", "make_classification", "KillWorkerOnTask"]


class TinyNet(torch.nn.Module):
    """A small softmax classifier: Linear → Tanh → Linear → softmax."""

    def __init__(self, n_features=20, hidden=16, n_outputs=3):
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(n_features, hidden), torch.nn.Tanh(),
            torch.nn.Linear(hidden, n_outputs))

    def forward(self, X):
        """Class probabilities (or raw outputs) for a batch."""
        return torch.softmax(self.net(X), dim=-1)


def make_classification(n_samples=240, n_features=20, n_classes=3, seed=0):
    """Linearly separable-ish float32 features and integer labels."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n_samples, n_features)).astype(np.float32)
    y = (X @ rng.normal(size=(n_features, n_classes))).argmax(1)
    return X, y


class KillWorkerOnTask(WorkerPlugin):
    """Fault injection: a worker process dies (or hangs) as it starts a matching task.

    Register it with ``client.register_plugin(KillWorkerOnTask(...))``. The
    worker that starts executing a task whose key matches ``pattern`` (a
    regular expression, searched) ends its process at once with
    ``os._exit`` — like a kill by the operating system, nothing is cleaned
    up — or, with ``hang=True``, stops it with ``SIGSTOP``: it stops
    heartbeating, and the scheduler removes it after
    ``distributed.scheduler.worker-ttl``. ``times`` failures at most, counted
    across every worker (and restarted worker) through files in
    ``sentinel_dir``, so a nanny that restarts the worker does not make it
    fail again.

    Parameters
    ----------
    pattern : str
        Regular expression matched against task keys (``str(key)``).
    sentinel_dir : str or os.PathLike
        Existing directory where each failure leaves a file.
    times : int
        How many workers to fail in all.
    hang : bool
        Stop the process instead of ending it (send it ``SIGKILL`` or
        ``SIGCONT`` afterwards: see :meth:`kills` for the process ids).
    """

    name = "daskdist-kill-worker-on-task"

    def __init__(self, pattern: str, sentinel_dir, times: int = 1, hang: bool = False):
        self.pattern = pattern
        self.sentinel_dir = os.fspath(sentinel_dir)
        self.times = times
        self.hang = hang

    def kills(self) -> list[tuple[int, str]]:
        """``(process id, task key)`` of every worker failed so far."""
        kills = []
        for name in sorted(os.listdir(self.sentinel_dir)):
            with open(os.path.join(self.sentinel_dir, name)) as f:
                pid, key = f.read().split(" ", 1)
            kills.append((int(pid), key))
        return kills

    def transition(self, key, start, finish, **kwargs):
        """Fail this worker process when a matching task starts executing."""
        if finish != "executing" or not re.search(self.pattern, str(key)):
            return
        for i in range(self.times):
            try:  # claim failure number i; another worker may have taken it
                fd = os.open(os.path.join(self.sentinel_dir, f"kill-{i}"),
                             os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                continue
            os.write(fd, f"{os.getpid()} {key}".encode())
            os.close(fd)
            if self.hang:
                os.kill(os.getpid(), signal.SIGSTOP)
            else:
                os._exit(1)
            return
