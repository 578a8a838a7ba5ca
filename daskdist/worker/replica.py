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

from ..compression import pack
from ..data.named import call, each, n_rows, take
from ..plan import RoundPlan
from ..spec import ModelSpec
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
from .batchnorm import count_rows, running_moments
from .devices import autocast, grad_scaler, seed_round, to_device
from .own_state import keep_part, latest_part, part_for, replica_owner
from .runtime import GLOBAL, keep, on_drop_run, set_lr, worker_address
from .stepping import clip_gradients, micro_batches, set_hyper

__all__ = ["Contribution", "Replica", "replica_for", "local_steps", "local_round", "gradient",
           "evaluate", "valid_batches",
           "pack_update", "sits_out", "skipped_update", "all_finite", "unscaled_overflowed",
           "use_scaler", "keep_scaler"]

_CACHE_SIZE = 16
_cache: OrderedDict = OrderedDict()
_cache_lock = threading.Lock()


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
    #: Wall time of the replica's round cycle not spent computing (overlapped rounds).
    sync_s: float | None = None

    def __sizeof__(self) -> int:
        # what Dask's memory accounting and task placement see (dask.sizeof)
        return object.__sizeof__(self) + tree_nbytes(self.payload)


class Replica:
    """A live module and optimizer built from a spec, cached on a worker (:func:`replica_for`)."""

    def __init__(self, spec: ModelSpec):
        self.spec = spec
        self.device = spec.device_here()
        self.module, self.optimizer = spec.build()
        self.scaler = grad_scaler(spec.precision, self.device)  # fp16's loss scale
        self.state = None  # the TrainingState the module's parameters hold
        self.optimizer_current = False  # the optimizer holds ``state.optimizer``
        # the optimizer state just exported by local_steps (valid until the next load)
        self.exported = None
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
            # the state just exported needs no loading when nothing came in between
            if state.optimizer is not self.exported:
                optimizer_state_from_numpy(self.optimizer, state.optimizer)
            self.optimizer_current = True
        self.exported = None

    def adopt(self, state: TrainingState) -> None:
        """Record that the module and optimizer were just captured as ``state``."""
        self.state, self.optimizer_current, self.buffers_current = state, True, True

    def moved_on(self, exported: dict | None = None) -> None:
        """The parameters were trained past the state they were loaded from.

        ``exported``: the optimizer's state, just exported (a later state
        holding this very dict need not load it again).
        """
        self.state, self.exported = None, exported

    def ran_forward(self) -> None:
        """A forward pass in training mode may have updated the buffers."""
        self.buffers_current = False

    def set_lr(self, lr) -> None:
        """Set the optimizer's learning rate (one, or one per parameter group)."""
        set_lr(self.optimizer, lr)


def replica_for(spec: ModelSpec, run_id: str, role) -> Replica:
    """The live replica of ``role`` in a fit on this worker, built from ``spec`` if need be."""
    key = (run_id, role)
    with _cache_lock:
        rep = _cache.get(key)
        if rep is not None and rep.spec is spec:
            _cache.move_to_end(key)
            return rep
    rep = Replica(spec)
    with _cache_lock:
        _cache[key] = rep
        while len(_cache) > _CACHE_SIZE:
            _cache.popitem(last=False)
    return rep


@on_drop_run
def drop_replicas(run_id: str) -> int:
    """Free the cached replicas of a finished fit; returns how many were dropped."""
    with _cache_lock:
        keys = [k for k in _cache if k[0] == run_id]
        for k in keys:
            del _cache[k]
    return len(keys)


def _backward(rep: Replica, X, y, w=None) -> torch.Tensor:
    """Forward and backward passes of a step's batch, micro-batch by micro-batch.

    Returns the batch's mean loss (detached; weighted by ``w`` where there
    are sample weights). Under autocast in reduced precision; with
    ``"fp16"`` the gradients are left scaled.
    """
    spec, module = rep.spec, rep.module
    total = None
    for X_part, y_part, w_part, share in micro_batches(spec, X, y, w):
        with autocast(spec.precision, rep.device):
            loss = spec.loss(call(module, X_part), y_part, w_part)
            if share != 1.0:
                loss = loss * share
        (loss if rep.scaler is None else rep.scaler.scale(loss)).backward()
        total = loss.detach() if total is None else total + loss.detach()
    return total


def _train_batch(rep: Replica, X, y, w, plan: RoundPlan, k: int) -> float:
    """Step ``k`` of the round: loss → backward → clipping → optimizer step; returns the loss.

    With ``"fp16"`` the loss is scaled, the gradients unscaled before
    clipping, and the scaler skips a step whose gradients overflowed (and
    lowers the scale).
    """
    module, optimizer, scaler = rep.module, rep.optimizer, rep.scaler
    set_hyper(optimizer, plan, k)
    optimizer.zero_grad()
    loss = _backward(rep, X, y, w)
    if scaler is None:
        clip_gradients(rep.spec, module.parameters())
        optimizer.step()
    else:
        scaler.unscale_(optimizer)
        clip_gradients(rep.spec, module.parameters())
        scaler.step(optimizer)
        scaler.update()
    return float(loss.item())


def _batches(shard, plan: RoundPlan):
    """``(X, y, w)`` of each step: ``w``, the sample weights, None where the shard has none."""
    weighted = getattr(shard, "weighted_batches", None)
    if weighted is not None:
        return weighted(plan)
    return ((X, y, None) for X, y in shard.batches(plan))


def local_steps(spec: ModelSpec, shard, state: TrainingState, plan: RoundPlan,
                part: dict | None = None) -> Contribution:
    """Run ``plan.n_steps`` local optimizer steps; return the new parameters.

    The body of the ``daskdist-round`` task of parameter-averaging strategies
    (``local_sgd``). The replica starts from ``state`` (parameters, buffers and
    optimizer state) and returns where it got to, weighted by the number of
    samples it trained on. ``part`` is what the replica keeps of its own
    (:mod:`daskdist.worker.own_state`): its loss scaler starts from there,
    and is left there.
    """
    t_start = time.time()
    rep = replica_for(spec, plan.run_id, plan.replica)
    rep.load(state)
    use_scaler(rep, part)
    rep.module.train()
    device = rep.device
    seed_round(plan, device)
    loss_sum, n, steps = 0.0, 0.0, 0
    t0 = time.perf_counter()
    for X, y, w in _batches(shard, plan):
        mass = n_rows(X) if w is None else float(w.sum())  # rows, or their sample weight
        loss_sum += _train_batch(rep, to_device(X, device), to_device(y, device), w, plan,
                                 steps) * mass
        n += mass
        steps += 1
        if not np.isfinite(loss_sum):
            break  # the round's update will be skipped: stop spending time on it
    compute_s = time.perf_counter() - t0
    keep_scaler(rep, part)
    payload = {
        "params": params_vector(rep.module),
        "buffers": buffers_to_numpy(rep.module),
        "optimizer": optimizer_state_to_numpy(rep.optimizer),
    }
    moments = running_moments(rep.module)
    if moments:  # BatchNorm: averaged as a mixture (daskdist.worker.batchnorm)
        payload["moments"] = moments
    rep.moved_on(exported=payload["optimizer"])
    if not (np.isfinite(loss_sum) and all_finite(payload)):
        return skipped_update(plan, steps, compute_s, t_start)
    return Contribution(plan.replica, float(n), payload, loss_sum, steps, compute_s,
                        t_start, time.time(), worker_address())


def local_round(spec: ModelSpec, shard, state: TrainingState, plan: RoundPlan) -> Contribution:
    """The ``daskdist-round`` task of ``local_sgd``: :func:`local_steps` from the global state.

    The state every replica starts the round from is kept on this worker
    (:mod:`daskdist.worker.runtime`), so that a recovery finds it on any
    replica's worker; so is the replica's own part (its loss scaler).
    """
    keep(plan.run_id, GLOBAL, state.round, state)
    owner = replica_owner(plan.replica)
    part = part_for(plan.run_id, owner, plan.round, state)
    contribution = local_steps(spec, shard, state, plan, part)
    keep_part(plan.run_id, owner, plan.round, part)
    return contribution


def use_scaler(rep: Replica, part: dict | None) -> None:
    """Give the replica the loss scaler of its part (a fresh one where the part has none).

    Nothing to do without fp16 (no scaler) or without a part (the caller
    does not track the scaler: it stays as the replica left it).
    """
    if rep.scaler is None or part is None:
        return
    rep.scaler = grad_scaler(rep.spec.precision, rep.device)
    if part.get("scaler"):
        rep.scaler.load_state_dict(part["scaler"])


def keep_scaler(rep: Replica, part: dict | None) -> None:
    """Record the replica's loss scaler in its part."""
    if rep.scaler is not None and part is not None:
        part["scaler"] = rep.scaler.state_dict()


def all_finite(tree) -> bool:
    """Whether every floating-point array in a (nested dict of) arrays is finite."""
    if isinstance(tree, dict):
        return all(all_finite(v) for v in tree.values())
    if isinstance(tree, np.ndarray) and tree.dtype.kind in "fc":
        return bool(np.isfinite(tree).all())
    return True


def skipped_update(plan: RoundPlan, steps: int, compute_s: float, t_start: float) -> Contribution:
    """The contribution of a replica whose update was not finite: weight zero, flagged."""
    return Contribution(plan.replica, 0.0, {}, 0.0, steps, compute_s, t_start, time.time(),
                        worker_address(), non_finite=True)


def gradient(spec: ModelSpec, shard, state: TrainingState, plan: RoundPlan,
             part: dict | None = None) -> Contribution:
    """Compute the gradient of one step on this replica's slice of the batch.

    The body of the ``daskdist-round`` task of ``sync``: the gradient is the
    mean over the replica's slice, weighted by the slice's size, so the
    weighted average over replicas is the gradient of the combined batch.
    ``part`` is what the replica keeps of its own (its loss scaler and
    ``topk`` residual, :mod:`daskdist.worker.own_state`), updated in place;
    without it (a round deadline, where arrival order rules anyway) the
    replica's newest part on this worker is used and kept.
    """
    t_start = time.time()
    if part is None:
        part = latest_part(plan.run_id, replica_owner(plan.replica))
        contribution = gradient(spec, shard, state, plan, part)
        keep_part(plan.run_id, replica_owner(plan.replica), plan.round, part)
        return contribution
    rep = replica_for(spec, plan.run_id, plan.replica)
    rep.load(state, with_optimizer=False)
    use_scaler(rep, part)
    rep.module.train()
    device = rep.device
    seed_round(plan, device)
    t0 = time.perf_counter()
    batch = next(iter(_batches(shard, plan)), None)
    if batch is None:  # shard exhausted: weight zero
        return sits_out(plan, 0, 0.0, t_start)
    X, y, w = batch
    module = rep.module
    module.zero_grad()
    with count_rows(module, {}) as rows:
        loss = _backward(rep, to_device(X, device), to_device(y, device), w)
    if rep.scaler is not None and unscaled_overflowed(rep, loss):
        # fp16's loss scale was too large: the scaler lowers it, and this replica sits the
        # step out (an overflow is not a non-finite update)
        keep_scaler(rep, part)
        return sits_out(plan, 1, time.perf_counter() - t0, t_start)
    keep_scaler(rep, part)
    grad = torch.nn.utils.parameters_to_vector(
        [p.grad if p.grad is not None else torch.zeros_like(p) for p in module.parameters()]
    ).detach().cpu().numpy()
    compute_s = time.perf_counter() - t0
    rep.ran_forward()
    payload = {"grad": grad, "buffers": buffers_to_numpy(module)}
    if rows:  # BatchNorm: combined as the combined batch's (daskdist.worker.batchnorm)
        payload["bn_rows"] = rows
    if not (torch.isfinite(loss).item() and all_finite(payload)):
        return skipped_update(plan, 1, compute_s, t_start)
    if plan.compression:
        payload["grad"] = pack_update(grad, plan, part)
    mass = float(n_rows(X)) if w is None else float(w.sum())  # rows, or their sample weight
    return Contribution(plan.replica, mass, payload, float(loss.item()) * mass, 1,
                        compute_s, t_start, time.time(), worker_address())


def sits_out(plan: RoundPlan, steps: int, compute_s: float, t_start: float) -> Contribution:
    """The contribution of a replica with no gradient this step (weight zero, not flagged)."""
    return Contribution(plan.replica, 0.0, {"grad": None, "buffers": None}, 0.0, steps,
                        compute_s, t_start, time.time(), worker_address())


def unscaled_overflowed(rep: Replica, loss) -> bool:
    """Unscale the gradients a scaled backward pass left; whether they overflowed.

    A non-finite loss is not an overflow: it is left to the non-finite checks.
    """
    rep.scaler.unscale_(rep.optimizer)
    overflow = bool(torch.isfinite(loss).item()) and not grads_finite(rep.module.parameters())
    rep.scaler.update()
    return overflow


def pack_update(update: np.ndarray, plan: RoundPlan, part: dict):
    """Compress an update with the error-feedback memory of ``part``, which keeps what is left.

    ``part`` is its owner's (a replica's, or under ``hierarchical`` a
    group's, :mod:`daskdist.worker.own_state`).
    """
    if plan.compression is None:  # sent as it is (diloco uncompressed)
        return update.astype(np.float32, copy=False)
    memory = part.get("residual")
    if memory is not None and memory.size != update.size:
        memory = None
    packed, left = pack(update, plan.compression, density=plan.density, residual=memory)
    part["residual"] = left
    return packed


def evaluate(spec: ModelSpec, shard, state: TrainingState, run_id: str, batch_size: int) -> dict:
    """Loss (and accuracy for classifiers) on the shard's hold-out rows.

    The ``daskdist-valid`` task run at each epoch boundary.
    """
    rep = replica_for(spec, run_id, ("eval", shard.replica))
    rep.load(state, with_optimizer=False)
    rep.module.eval()
    device = rep.device
    n = shard.n_valid
    loss_sum, correct = 0.0, 0
    with torch.no_grad():
        for X, y in valid_batches(shard, batch_size, run_id):
            X, y = to_device(X, device), to_device(y, device)
            y_pred = call(rep.module, X)
            loss_sum += float(spec.loss(y_pred, y).item()) * len(y)
            if spec.classifier:
                correct += int((y_pred.argmax(dim=1) == y).sum().item())
    return {"replica": shard.replica, "n": n, "loss_sum": loss_sum, "correct": correct}


def valid_batches(shard, batch_size: int, run_id: str):
    """``(X, y)`` tensors of a shard's hold-out, ``batch_size`` rows at a time."""
    read = getattr(shard, "valid_batches", None)
    if read is not None:  # a Dataset shard reads them
        yield from read(batch_size, run_id)
        return
    for start in range(0, shard.n_valid, max(batch_size, 1)):
        rows = slice(start, start + batch_size)
        yield (each(take(shard.X_valid, rows), torch.from_numpy),
               torch.from_numpy(shard.y_valid[rows]))
