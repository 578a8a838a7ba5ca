"""Helpers for testing code that uses daskdist: small modules and data.

Modules defined here are importable on every worker, so tests can ship them
to real worker processes by reference.
"""

from __future__ import annotations

import os
import random
import re
import signal
import threading
import time

import numpy as np
import torch
from distributed import WorkerPlugin

from ..callbacks import Checkpoint

__all__ = ["CtrlCAfterRound", "TinyNet", "TinyBatchNormNet", "TinySequential",
           "TinyBlockStack", "ResidualBlock", "LinearStack",
           "FailOnLargeInput", "StragglerNet", "PacedNet", "make_classification",
           "KillWorkerOnTask", "DriftingSGD", "WorkerScaledNet", "NpyFiles", "write_npy_files",
           "nll_loss", "reference_steps"]


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


class TinySequential(torch.nn.Sequential):
    """:class:`TinyNet`'s layers as one ``Sequential`` (which ``strategy="pipeline"`` splits).

    Linear → Tanh → Linear → Tanh → Linear, then softmax (``n_outputs``
    class probabilities) or, with ``softmax=False``, raw outputs.
    """

    def __init__(self, n_features=20, hidden=16, n_outputs=3, softmax=True):
        layers = [torch.nn.Linear(n_features, hidden), torch.nn.Tanh(),
                  torch.nn.Linear(hidden, hidden), torch.nn.Tanh(),
                  torch.nn.Linear(hidden, n_outputs)]
        super().__init__(*layers, *([torch.nn.Softmax(dim=-1)] if softmax else []))


class LinearStack(torch.nn.Sequential):
    """``depth`` layers of ``Linear(width, width)``: a model whose size ``width`` sets.

    With ``width=8192`` and ``depth=4``, 268M parameters (1 GiB in float32):
    larger than a test worker may hold with its gradients.
    """

    def __init__(self, width=8192, depth=4):
        super().__init__(*(torch.nn.Linear(width, width) for _ in range(depth)))


class ResidualBlock(torch.nn.Module):
    """A transformer-style block without attention: ``x + mlp(layer_norm(x))``."""

    def __init__(self, width=16):
        super().__init__()
        self.norm = torch.nn.LayerNorm(width)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(width, 2 * width), torch.nn.GELU(),
                                       torch.nn.Linear(2 * width, width))

    def forward(self, x):
        """The block's output for a batch of ``width`` features."""
        return x + self.mlp(self.norm(x))


class TinyBlockStack(torch.nn.Module):
    """A stack of residual blocks that declares its pipeline stages with ``stages()``.

    Not a ``Sequential``: an input projection, ``n_blocks``
    :class:`ResidualBlock` in a ``ModuleList``, and a head (registered
    first, so its parameters come first in the model's own order) that
    gives class probabilities.
    """

    def __init__(self, n_features=20, width=16, n_blocks=3, n_outputs=3):
        super().__init__()
        self.head = torch.nn.Sequential(torch.nn.LayerNorm(width),
                                        torch.nn.Linear(width, n_outputs),
                                        torch.nn.Softmax(dim=-1))
        self.embed = torch.nn.Linear(n_features, width)
        self.blocks = torch.nn.ModuleList(ResidualBlock(width) for _ in range(n_blocks))

    def stages(self):
        """The sub-modules that, called one after another, make the forward pass."""
        return [self.embed, *self.blocks, self.head]

    def forward(self, X):
        """Class probabilities for a batch."""
        for unit in self.stages():
            X = unit(X)
        return X


class TinyBatchNormNet(torch.nn.Module):
    """:class:`TinyNet` with a BatchNorm layer: Linear → BatchNorm1d → Tanh → Linear → softmax."""

    def __init__(self, n_features=20, hidden=16, n_outputs=3, momentum=0.1):
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(n_features, hidden), torch.nn.BatchNorm1d(hidden, momentum=momentum),
            torch.nn.Tanh(), torch.nn.Linear(hidden, n_outputs))

    def forward(self, X):
        """Class probabilities for a batch."""
        return torch.softmax(self.net(X), dim=-1)


class FailOnLargeInput(TinyNet):
    """:class:`TinyNet` whose training forward pass raises ``ValueError`` on large inputs.

    A fault in the user's code on some rows only: a batch holding a value
    above ``limit`` (in absolute value) fails, on whichever replica trains it.
    """

    def __init__(self, n_features=20, hidden=16, n_outputs=3, limit=1e3):
        super().__init__(n_features, hidden, n_outputs)
        self.limit = limit

    def forward(self, X):
        """As :class:`TinyNet`, after checking the batch."""
        if self.training and X.abs().max() > self.limit:
            raise ValueError(f"input too large (above {self.limit:g})")
        return super().forward(X)


class StragglerNet(TinyNet):
    """:class:`TinyNet` whose training steps take a set time, longer on stragglers.

    Each forward pass in training mode sleeps ``step_time`` seconds, or
    ``slowdown`` times that on a straggler, so that replicas run at known
    speeds whatever else the machine does. The replicas on the worker at
    address ``slow_worker`` are always stragglers (a persistent straggler);
    any other replica is one for a whole round with probability
    ``slow_probability`` (a transient straggler), drawn from torch's seed,
    which daskdist sets per round and replica.
    """

    def __init__(self, n_features=20, hidden=16, n_outputs=3, step_time=0.0,
                 slowdown=3.0, slow_worker=None, slow_probability=0.0):
        super().__init__(n_features, hidden, n_outputs)
        self.step_time, self.slowdown = step_time, slowdown
        self.slow_worker, self.slow_probability = slow_worker, slow_probability

    def straggling(self) -> bool:
        """Whether this replica is a straggler in the current round."""
        if self.slow_worker is not None and _worker_address() == self.slow_worker:
            return True
        return random.Random(torch.initial_seed()).random() < self.slow_probability

    def forward(self, X):
        """Class probabilities; in training mode, after the step's set time."""
        if self.training and self.step_time:
            time.sleep(self.step_time * (self.slowdown if self.straggling() else 1.0))
        return super().forward(X)


class PacedNet(TinyNet):
    """:class:`TinyNet` whose training forward pass sleeps ``sample_time`` per sample.

    Paced by the sample, not the step, since a replica's share of the global
    batch shrinks as replicas join: a fit's speed then follows its replica
    count (and ``slowdown`` on the worker ``slow_worker``), not the machine.
    """

    def __init__(self, n_features=20, hidden=16, n_outputs=3, sample_time=0.0,
                 slowdown=3.0, slow_worker=None):
        super().__init__(n_features, hidden, n_outputs)
        self.sample_time, self.slowdown, self.slow_worker = sample_time, slowdown, slow_worker

    def forward(self, X):
        """Class probabilities; in training mode, after ``sample_time`` per row of ``X``."""
        if self.training and self.sample_time:
            slow = self.slow_worker is not None and _worker_address() == self.slow_worker
            time.sleep(self.sample_time * len(X) * (self.slowdown if slow else 1.0))
        return super().forward(X)


def _worker_address():
    from distributed import get_worker

    try:
        return get_worker().address
    except ValueError:
        return None


class DriftingSGD(torch.optim.SGD):
    """SGD that, on the worker at address ``drift_worker``, adds ``drift`` to every parameter.

    Replicas meant to hold equal copies drift apart: the replica agreement
    check must see it.
    """

    def __init__(self, params, lr=0.1, drift_worker=None, drift=1e-4, **kwargs):
        super().__init__(params, lr=lr, **kwargs)
        self.drift_worker, self.drift = drift_worker, drift

    def step(self, closure=None):
        """An SGD step, then the drift on the named worker."""
        loss = super().step(closure)
        if self.drift_worker is not None and _worker_address() == self.drift_worker:
            with torch.no_grad():
                for group in self.param_groups:
                    for p in group["params"]:
                        p.add_(self.drift)
        return loss


class WorkerScaledNet(TinyNet):
    """:class:`TinyNet` whose inputs are scaled by ``scale`` on the worker at ``worker``.

    The replicas compute different gradients, but still apply the same
    averaged update: their copies stay equal.
    """

    def __init__(self, n_features=20, hidden=16, n_outputs=3, worker=None, scale=1.5):
        super().__init__(n_features, hidden, n_outputs)
        self.worker, self.scale = worker, scale

    def forward(self, X):
        """Class probabilities of ``X``, scaled first on the named worker."""
        if self.worker is not None and _worker_address() == self.worker:
            X = X * self.scale
        return super().forward(X)


def nll_loss(module, X, y):
    """The loss a classifier of probabilities (TinyNet) trains on, for references in tests.

    ``NLLLoss`` of the log of the module's output, as the estimators compute it.
    """
    out = module(torch.from_numpy(X))
    return torch.nn.functional.nll_loss(torch.log(out + torch.finfo(out.dtype).eps),
                                        torch.from_numpy(y))


def reference_steps(module, optimizer, X, y, batches) -> int:
    """Plain torch steps of a reference in tests: one :func:`nll_loss` step per row batch.

    ``batches`` are arrays of row indices; returns the rows trained on.
    """
    seen = 0
    for rows in batches:
        optimizer.zero_grad()
        nll_loss(module, X[rows], y[rows]).backward()
        optimizer.step()
        seen += len(rows)
    return seen


def make_classification(n_samples=240, n_features=20, n_classes=3, seed=0):
    """Linearly separable-ish float32 features and integer labels."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n_samples, n_features)).astype(np.float32)
    y = (X @ rng.normal(size=(n_features, n_classes))).argmax(1)
    return X, y


def write_npy_files(root, X, y) -> NpyFiles:
    """Write one ``.npy`` file per sample (features) and per target under ``root``."""
    for sub in ("x", "y"):
        os.makedirs(os.path.join(root, sub), exist_ok=True)
    for i in range(len(X)):
        np.save(os.path.join(root, "x", f"{i:06d}.npy"), X[i])
        np.save(os.path.join(root, "y", f"{i:06d}.npy"), np.asarray(y[i]))
    return NpyFiles(root, len(X))


class NpyFiles(torch.utils.data.Dataset):
    """A dataset that reads each sample from its own ``.npy`` files, by index.

    Holds only the folder and the number of samples; counts its reads in
    the process that reads (:attr:`reads`).
    """

    reads = 0

    def __init__(self, root, n: int):
        self.root = os.fspath(root)
        self.n = int(n)

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        type(self).reads += 1
        X = np.load(os.path.join(self.root, "x", f"{i:06d}.npy"))
        y = np.load(os.path.join(self.root, "y", f"{i:06d}.npy"))
        return X, y[()]


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
    delay : float
        Seconds into the task at which the process fails (0: as it starts),
        for tasks that run long, such as a ``ddp`` epoch.
    """

    name = "daskdist-kill-worker-on-task"

    def __init__(self, pattern: str, sentinel_dir, times: int = 1, hang: bool = False,
                 delay: float = 0.0):
        self.pattern = pattern
        self.sentinel_dir = os.fspath(sentinel_dir)
        self.times = times
        self.hang = hang
        self.delay = delay

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
            if self.delay:
                threading.Timer(self.delay, self._fail).start()
            else:
                self._fail()
            return

    def _fail(self) -> None:
        if self.hang:
            os.kill(os.getpid(), signal.SIGSTOP)
        else:
            os._exit(1)


class CtrlCAfterRound(Checkpoint):
    """A round checkpoint that sends this process SIGINT once it saved a round of ``epoch``.

    Ctrl-C in the middle of an epoch, at a known point: the checkpoint holds
    the round before it (``every_rounds`` sets how often rounds are saved).
    """

    def __init__(self, dirname="checkpoint", every=1, every_rounds=None, at_train_end=True,
                 epoch=1):
        super().__init__(dirname, every=every, every_rounds=every_rounds,
                         at_train_end=at_train_end)
        self.epoch = epoch

    def save_round(self, net, state):
        """Save the round's state, then press Ctrl-C if it belongs to ``epoch``."""
        super().save_round(net, state)
        if any(r["epoch"] == self.epoch for r in state.log):
            signal.raise_signal(signal.SIGINT)
