"""The replica: what runs on a worker in each round.

Every function here is a Dask task body and a pure function of its inputs —
the model spec, the shard, the training state and a :class:`RoundPlan`. A
worker keeps the live module and optimizer of each replica in a small cache so
that a round does not rebuild them, but the cache is only a shortcut: a replica
rebuilt from the same inputs on another worker computes the same result.

The inner loop is a plain torch loop shaped like skorch's training step:
loss → backward → synchronisation hook → optimizer step.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch

from ..compression import pack, residuals
from ..data.streaming import drop_streams
from ..errors import NonFiniteError, StateLost
from ..spec import ModelSpec, seed_for
from ..state import (
    TrainingState,
    buffers_to_numpy,
    grads_finite,
    load_buffers,
    load_params,
    optimizer_state_from_numpy,
    optimizer_state_to_numpy,
    params_vector,
    tree_nbytes,
)
from . import process_group
from .devices import autocast, grad_scaler, to_device, use_device

__all__ = ["RoundPlan", "Contribution", "StateLost", "NonFiniteError", "local_steps", "gradient",
           "evaluate", "drop_run"]

_CACHE_SIZE = 16
_cache: OrderedDict = OrderedDict()
_cache_lock = threading.Lock()


@dataclass(frozen=True)
class RoundPlan:
    """What one replica does in one round.

    Attributes
    ----------
    run_id : str
        Identifies the fit (worker caches are keyed by it).
    replica : int
        Replica index.
    epoch : int
        Epoch index (0-based, counted over the whole fit).
    round : int
        Round index over the whole fit.
    first_step : int
        Index, within the epoch, of the round's first step.
    n_steps : int
        Optimizer steps in this round.
    batch_size : int
        This replica's share of the global batch.
    lr : float or tuple of float
        Learning rate for every step of the round (one per parameter group).
    random_state : int
        Seed of the fit; shuffles and torch seeds derive from it.
    shuffle : bool
        Reshuffle the shard every epoch.
    max_non_finite : int or None
        Non-finite replica updates the fit tolerates before it fails with
        :class:`NonFiniteError` (``None``: any number).
    epoch_steps : int or None
        Steps in a whole epoch, so that the round that ends an epoch can count
        it as completed (``None``: not known).
    compression : {None, "fp16", "bf16", "topk"}
        How the replica packs what it sends (:mod:`daskdist.compression`).
    density : float
        Share of entries ``"topk"`` sends.
    """

    run_id: str
    replica: int
    epoch: int
    round: int
    first_step: int
    n_steps: int
    batch_size: int
    lr: float | tuple
    random_state: int
    shuffle: bool = False
    max_non_finite: int | None = None
    epoch_steps: int | None = None
    compression: str | None = None
    density: float = 0.01

    def epochs_completed(self) -> int:
        """Epochs completed once this round is done (``epoch``, or one more at its end)."""
        ends_epoch = (self.epoch_steps is not None
                      and self.first_step + self.n_steps >= self.epoch_steps)
        return self.epoch + int(ends_epoch)

    def positions(self, n_samples: int) -> list[np.ndarray]:
        """Shard positions of each step's batch (empty once the shard is exhausted)."""
        order = _epoch_order(n_samples, self)
        b = self.batch_size
        return [order[(self.first_step + k) * b:(self.first_step + k + 1) * b]
                for k in range(self.n_steps)]


@dataclass
class Contribution:
    """What a replica sends to the aggregation after a round.

    ``payload`` holds the arrays to average (``grad``, or ``params`` and
    ``optimizer``, plus ``buffers``); ``weight`` is the number of samples
    behind them. A replica whose update is not finite sends weight zero and
    ``non_finite=True``: the average leaves it out.
    """

    replica: int
    weight: float
    payload: dict
    loss_sum: float
    steps: int
    compute_s: float
    t_start: float
    t_end: float
    worker: str | None
    non_finite: bool = False

    def __sizeof__(self) -> int:
        # what Dask's memory accounting and task placement see (dask.sizeof)
        return object.__sizeof__(self) + tree_nbytes(self.payload)


class _Replica:
    """A live module and optimizer built from a spec, cached on a worker."""

    def __init__(self, spec: ModelSpec):
        self.spec = spec
        self.device = spec.device_here()
        self.module, self.optimizer = spec.build()
        self.scaler = grad_scaler(spec.precision, self.device)  # fp16's loss scale
        self.state = None  # the TrainingState the module's parameters hold
        self.optimizer_current = False  # the optimizer holds ``state.optimizer``
        self.buffers_current = False  # the buffers hold ``state.buffers``

    def load(self, state: TrainingState, with_optimizer: bool = True) -> None:
        """Make the module (and optimizer) hold ``state``, copying only what differs."""
        if state is not self.state:
            load_params(self.module, state.params, state.buffers)
            self.state, self.optimizer_current, self.buffers_current = state, False, True
        elif not self.buffers_current:
            load_buffers(self.module, state.buffers)
            self.buffers_current = True
        if with_optimizer and not self.optimizer_current:
            optimizer_state_from_numpy(self.optimizer, state.optimizer)
            self.optimizer_current = True

    def adopt(self, state: TrainingState) -> None:
        """Record that the module and optimizer were just captured as ``state``."""
        self.state, self.optimizer_current, self.buffers_current = state, True, True

    def moved_on(self) -> None:
        """The parameters were trained past the state they were loaded from."""
        self.state = None

    def ran_forward(self) -> None:
        """A forward pass in training mode may have updated the buffers."""
        self.buffers_current = False

    def set_lr(self, lr) -> None:
        set_lr(self.optimizer, lr)


def set_lr(optimizer, lr) -> None:
    """Set each parameter group's learning rate (``lr``: one for all, or one per group)."""
    groups = optimizer.param_groups
    lrs = lr if isinstance(lr, (tuple, list)) else [lr] * len(groups)
    for group, value in zip(groups, lrs):
        group["lr"] = value


def _replica(spec: ModelSpec, run_id: str, role) -> _Replica:
    key = (run_id, role)
    with _cache_lock:
        rep = _cache.get(key)
        if rep is not None and rep.spec is spec:
            _cache.move_to_end(key)
            return rep
    rep = _Replica(spec)
    with _cache_lock:
        _cache[key] = rep
        while len(_cache) > _CACHE_SIZE:
            _cache.popitem(last=False)
    return rep


def drop_run(run_id: str) -> int:
    """Free the cached replicas (stages, chunk streams, ddp process group) of a finished fit.

    Returns how many replicas were dropped.
    """
    from . import stage_tasks  # (it imports this module)

    drop_streams(run_id)
    stage_tasks.drop_run(run_id)
    residuals.drop_run(run_id)
    process_group.leave(run_id)
    with _cache_lock:
        keys = [k for k in _cache if k[0] == run_id]
        for k in keys:
            del _cache[k]
    return len(keys)


def _epoch_order(n_samples: int, plan: RoundPlan) -> np.ndarray:
    if not plan.shuffle:
        return np.arange(n_samples)
    rng = np.random.default_rng(seed_for(plan.random_state, 1, plan.epoch, plan.replica))
    return rng.permutation(n_samples)


def _worker_address():
    try:
        from distributed import get_worker

        return get_worker().address
    except ValueError:
        return None


def _seed_round(plan: RoundPlan, device: str) -> None:
    seed_generators(seed_for(plan.random_state, 2, plan.round, plan.replica), device)


def seed_generators(seed: int, device: str) -> None:
    """Seed the generators a replica on ``device`` uses (and make it the current GPU).

    Only those: ``torch.manual_seed`` also queues a lazy seeding of every
    CUDA device, which costs milliseconds on each call.
    """
    torch.default_generator.manual_seed(seed)
    if use_device(device):
        torch.cuda.manual_seed(seed)


def _train_batch(rep: _Replica, X, y) -> float:
    """One step: loss → backward → optimizer step; returns the loss.

    In reduced precision the forward pass and loss run under autocast; with
    ``"fp16"`` the loss is scaled, and the scaler skips a step whose
    gradients overflowed (and lowers the scale).
    """
    module, optimizer, scaler = rep.module, rep.optimizer, rep.scaler
    optimizer.zero_grad()
    with autocast(rep.spec.precision, rep.device):
        loss = rep.spec.loss(module(X), y)
    if scaler is None:
        loss.backward()
        optimizer.step()
    else:
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    return float(loss.item())


def local_steps(spec: ModelSpec, shard, state: TrainingState, plan: RoundPlan) -> Contribution:
    """Run ``plan.n_steps`` local optimizer steps; return the new parameters.

    The ``daskdist-round`` task of parameter-averaging strategies
    (``local_sgd``). The replica starts from ``state`` (parameters, buffers and
    optimizer state) and returns where it got to, weighted by the number of
    samples it trained on.
    """
    t_start = time.time()
    rep = _replica(spec, plan.run_id, plan.replica)
    rep.load(state)
    rep.set_lr(plan.lr)
    rep.module.train()
    device = rep.device
    _seed_round(plan, device)
    loss_sum, n, steps = 0.0, 0, 0
    t0 = time.perf_counter()
    for X, y in shard.batches(plan):
        loss_sum += _train_batch(rep, to_device(X, device), to_device(y, device)) * len(X)
        n += len(X)
        steps += 1
        if not np.isfinite(loss_sum):
            break  # the round's update will be skipped: stop spending time on it
    compute_s = time.perf_counter() - t0
    payload = {
        "params": params_vector(rep.module),
        "buffers": buffers_to_numpy(rep.module),
        "optimizer": optimizer_state_to_numpy(rep.optimizer),
    }
    rep.moved_on()
    if not (np.isfinite(loss_sum) and _all_finite(payload)):
        return _skipped(plan, steps, compute_s, t_start)
    return Contribution(plan.replica, float(n), payload, loss_sum, steps, compute_s,
                        t_start, time.time(), _worker_address())


def _all_finite(tree) -> bool:
    """Whether every floating-point array in a (nested dict of) arrays is finite."""
    if isinstance(tree, dict):
        return all(_all_finite(v) for v in tree.values())
    if isinstance(tree, np.ndarray) and tree.dtype.kind in "fc":
        return bool(np.isfinite(tree).all())
    return True


def _skipped(plan: RoundPlan, steps: int, compute_s: float, t_start: float) -> Contribution:
    """The contribution of a replica whose update was not finite: weight zero, flagged."""
    return Contribution(plan.replica, 0.0, {}, 0.0, steps, compute_s, t_start, time.time(),
                        _worker_address(), non_finite=True)


def gradient(spec: ModelSpec, shard, state: TrainingState, plan: RoundPlan) -> Contribution:
    """Compute the gradient of one step on this replica's slice of the batch.

    The ``daskdist-round`` task of ``sync``: the gradient is the mean over the
    replica's slice, weighted by the slice's size, so the weighted average over
    replicas is the gradient of the combined batch.
    """
    t_start = time.time()
    rep = _replica(spec, plan.run_id, plan.replica)
    rep.load(state, with_optimizer=False)
    rep.module.train()
    device = rep.device
    _seed_round(plan, device)
    t0 = time.perf_counter()
    batch = next(iter(shard.batches(plan)), None)
    if batch is None:  # shard exhausted: weight zero
        return _sits_out(plan, 0, 0.0, t_start)
    X, y = batch
    module = rep.module
    module.zero_grad()
    with autocast(spec.precision, device):
        loss = spec.loss(module(to_device(X, device)), to_device(y, device))
    if rep.scaler is None:
        loss.backward()
    elif _scaled_backward_overflowed(rep, loss):
        # fp16's loss scale was too large: the scaler lowers it, and this replica sits the
        # step out (an overflow is not a non-finite update)
        return _sits_out(plan, 1, time.perf_counter() - t0, t_start)
    grad = torch.nn.utils.parameters_to_vector(
        [p.grad if p.grad is not None else torch.zeros_like(p) for p in module.parameters()]
    ).detach().cpu().numpy()
    compute_s = time.perf_counter() - t0
    rep.ran_forward()
    payload = {"grad": grad, "buffers": buffers_to_numpy(module)}
    if not (torch.isfinite(loss).item() and _all_finite(payload)):
        return _skipped(plan, 1, compute_s, t_start)
    if plan.compression:
        payload["grad"] = _pack(grad, plan)
    return Contribution(plan.replica, float(len(X)), payload, float(loss.item()) * len(X), 1,
                        compute_s, t_start, time.time(), _worker_address())


def _sits_out(plan: RoundPlan, steps: int, compute_s: float, t_start: float) -> Contribution:
    """The contribution of a replica with no gradient this step (weight zero, not flagged)."""
    return Contribution(plan.replica, 0.0, {"grad": None, "buffers": None}, 0.0, steps,
                        compute_s, t_start, time.time(), _worker_address())


def _scaled_backward_overflowed(rep: _Replica, loss) -> bool:
    """Backward of the scaled loss, gradients unscaled; whether they overflowed.

    A non-finite loss is not an overflow: it is left to the non-finite checks.
    """
    rep.scaler.scale(loss).backward()
    rep.scaler.unscale_(rep.optimizer)
    overflow = bool(torch.isfinite(loss).item()) and not grads_finite(rep.module.parameters())
    rep.scaler.update()
    return overflow


def _pack(update: np.ndarray, plan: RoundPlan):
    """Compress a replica's update, with its error-feedback memory on this worker."""
    memory = residuals.take(plan.run_id, plan.replica, update.size)
    packed, left = pack(update, plan.compression, density=plan.density, residual=memory)
    residuals.keep(plan.run_id, plan.replica, left)
    return packed


def evaluate(spec: ModelSpec, shard, state: TrainingState, run_id: str, batch_size: int) -> dict:
    """Loss (and accuracy for classifiers) on the shard's hold-out rows.

    The ``daskdist-valid`` task run at each epoch boundary.
    """
    rep = _replica(spec, run_id, ("eval", shard.replica))
    rep.load(state, with_optimizer=False)
    rep.module.eval()
    device = rep.device
    n = shard.n_valid
    loss_sum, correct = 0.0, 0
    with torch.no_grad():
        for start in range(0, n, max(batch_size, 1)):
            X = to_device(torch.from_numpy(shard.X_valid[start:start + batch_size]), device)
            y = to_device(torch.from_numpy(shard.y_valid[start:start + batch_size]), device)
            y_pred = rep.module(X)
            loss_sum += float(spec.loss(y_pred, y).item()) * len(X)
            if spec.classifier:
                correct += int((y_pred.argmax(dim=1) == y).sum().item())
    return {"replica": shard.replica, "n": n, "loss_sum": loss_sum, "correct": correct}
