"""The worker side of ``ddp``: one rank's epoch of DistributedDataParallel steps.

:func:`train_rank` is the ``daskdist-ddp`` task, one per worker and epoch: it
joins the epoch's process group (:mod:`daskdist.worker.process_group`) and
trains the worker's shards with DistributedDataParallel; gradients are
averaged by the backend's allreduce during the backward pass. The rank that
trains every step returns the epoch's final state, and :func:`finish_ranks`
(the epoch's ``average`` task) writes every step's round log from all ranks'
results. See :mod:`daskdist.strategies.ddp` for the maths and the driver.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, replace

import numpy as np
import torch

from ..dashboard.events import emit_from_worker, round_event
from ..data.named import call, is_named, n_rows
from ..errors import GroupAborted, NonFiniteError
from ..state import (
    TrainingState,
    buffers_to_numpy,
    grads_finite,
    module_to_state,
    params_vector,
)
from . import process_group
from .aggregation import check_non_finite
from .devices import autocast, grad_scaler, is_cuda, seed_round, to_device
from .fingerprint import fingerprint_of, replica_drift
from .replica import replica_for
from .runtime import worker_address
from .stepping import clip_gradients, set_hyper
from .sync_batchnorm import convert

__all__ = ["RankResult", "train_rank", "finish_ranks", "device_options", "module_nbytes",
           "step_rows_of", "failed_step", "failed_at", "blames_itself", "EMIT_S",
           "STOP_CHECK_STEPS", "MIN_LOSS_SCALE"]

#: Seconds between the rank-0 task's progress events.
EMIT_S = 0.25
#: Steps between the ranks' joint check that the driver still wants the epoch.
STOP_CHECK_STEPS = 32

@dataclass
class RankResult:
    """What one rank reports of an epoch (``state``: only the rank that holds it)."""

    rank: int
    replicas: tuple
    worker: str | None
    samples: np.ndarray  # (steps, replicas of the rank): rows of each replica's slice
    loss_sums: np.ndarray  # (steps,): the rank's loss times its rows
    step_end: np.ndarray  # (steps,): wall time at the end of each step
    step_s: np.ndarray  # (steps,): seconds each step took on this rank
    finite: np.ndarray  # (steps,): whether the rank's own loss was finite
    skipped: tuple  # steps whose mean gradient was not finite (the same on every rank)
    t_start: float
    state: TrainingState | None = None
    fingerprint: np.ndarray | None = None  # of the rank's copy at the epoch's end

    def __sizeof__(self) -> int:
        state = 0 if self.state is None else self.state.nbytes
        arrays = (self.samples, self.loss_sums, self.step_end, self.step_s, self.finite)
        return object.__sizeof__(self) + state + sum(a.nbytes for a in arrays)


def step_rows_of(size: int, batch: int, step: int) -> int:
    """Rows of a replica's slice of step ``step`` (0 once its shard is used up)."""
    return max(0, min(batch, size - step * batch))


def _batch(parts, device):
    """The step's batches of a rank's replicas, put together."""
    if len(parts) == 1:
        X, y = parts[0]
    else:
        first = parts[0][0]
        X = ({key: torch.cat([X[key] for X, _ in parts]) for key in first}
             if is_named(first) else torch.cat([X for X, _ in parts]))
        y = None if parts[0][1] is None else torch.cat([y for _, y in parts])
    return to_device(X, device), to_device(y, device)


def train_rank(spec, state: TrainingState, *shards, group, rank: int, plans: tuple,
               step_rows: tuple, holder: int, common_steps: int, options: dict,
               sync_batchnorm: bool = False) -> RankResult:
    """Train one rank's shards for the rest of an epoch in the process group ``group``.

    The ``daskdist-ddp`` task. ``plans`` holds one
    :class:`~daskdist.worker.replica.RoundPlan` per replica of this rank, covering
    the steps left in the epoch; ``step_rows`` the rows of each of those
    steps over all ranks. The rank ``holder`` (one that trains every step)
    returns the epoch's final parameters, buffers and optimizer state.
    ``common_steps``: the steps every rank trains; when some rank runs out of
    data before the last step, every rank trains inside DDP's ``join``. Every
    :data:`STOP_CHECK_STEPS` steps of those, the ranks check together whether
    the driver gave the epoch up (interrupted, or a rank lost), and stop at
    the same step if so. With ``sync_batchnorm`` the module's BatchNorm layers
    normalise over every rank's batch (:mod:`daskdist.worker.sync_batchnorm`).
    A failed rank's exception carries
    ``daskdist_rank``, ``daskdist_step`` and ``daskdist_failed_at``.
    """
    t_start = time.time()
    progress = [0]
    member = None
    try:
        member = process_group.join(group, rank)
        return _train(spec, state, shards, member, rank, plans, step_rows, holder,
                      common_steps, options, progress, t_start, sync_batchnorm)
    except BaseException as error:
        error.daskdist_rank, error.daskdist_step = rank, progress[0]
        error.daskdist_failed_at = time.time()
        if member is not None:  # never joined again; destroyed when the process joins another
            member.broken = True
        raise
    finally:
        if member is not None:
            process_group.release(member)


def _train(spec, state, shards, member, rank, plans, step_rows, holder, common_steps, options,
           progress, t_start, sync_batchnorm=False) -> RankResult:
    first = plans[0]
    world = member.spec.world_size
    rep = replica_for(spec, first.run_id, ("ddp", rank))
    rep.load(state)
    rep.module.train()
    device = rep.device
    if sync_batchnorm:
        convert(rep.module, device)
    model = member.wrap(rep.module, device, **options, **device_options(device))
    if rep.scaler is not None:  # fp16: every rank starts the epoch with the same loss scale
        rep.scaler = _agreed_scaler(rep.scaler, spec.precision, device)
    params = [p for p in rep.module.parameters() if p.requires_grad]
    batches = [shard.batches(plan) for shard, plan in zip(shards, plans)]
    n = len(step_rows)
    samples = np.zeros((n, len(plans)), dtype=np.int64)
    loss_sums, step_end, step_s = np.zeros(n), np.zeros(n), np.zeros(n)
    finite = np.ones(n, dtype=bool)
    skipped, skipped_count = [], state.skipped
    emitter = _Progress(first, step_rows, member, rank == 0)
    uneven = common_steps < n
    abort = process_group.abort_event(member.spec.key) if rank == 0 else None
    with model.join() if uneven else contextlib.nullcontext():
        for k in range(n):
            if k and k % STOP_CHECK_STEPS == 0 and k < common_steps \
                    and _stopped(abort, device):
                raise GroupAborted(
                    f"The driver gave up epoch {first.epoch}; rank {rank} stopped at step {k}.")
            parts = [next(b, None) for b in batches]
            counts = [0 if p is None else n_rows(p[0]) for p in parts]
            rows = sum(counts)
            if not rows:
                if not uneven:
                    raise RuntimeError(f"Rank {rank} ran out of data at step {k} of {n}.")
                break  # DDP's join stands in for this rank in the remaining steps
            t0 = time.perf_counter()
            X, y = _batch([p for p in parts if p is not None], device)
            step_plan = replace(first, round=first.round + k)
            seed_round(step_plan, device)
            set_hyper(rep.optimizer, first, k)
            rep.optimizer.zero_grad()
            with autocast(spec.precision, device):
                loss = spec.loss(call(model, X), y)
            # this rank's share of the step's mean; a non-finite loss makes every rank's
            # mean gradient NaN, so that all of them skip the step (no sync with the device)
            share = torch.where(torch.isfinite(loss.detach()), rows * world / step_rows[k],
                                float("nan"))
            scaled = loss * share
            (scaled if rep.scaler is None else rep.scaler.scale(scaled)).backward()
            loss_sums[k] = float(loss.item()) * rows
            finite[k] = np.isfinite(loss_sums[k])
            if rep.scaler is not None:
                rep.scaler.unscale_(rep.optimizer)
            if grads_finite(params):  # the mean gradient: the same on every rank
                clip_gradients(spec, params)
                if rep.scaler is None:
                    rep.optimizer.step()
                else:
                    rep.scaler.step(rep.optimizer)  # (the gradients are unscaled already)
            elif rep.scaler is None:  # skipped on every rank: one skipped update
                skipped.append(k)
                skipped_count = _count_skipped(skipped_count, plans, counts, finite[k],
                                               step_plan)
            else:  # fp16: the same loss scale on every rank decides (see _check_scale)
                skipped.append(k)
                skipped_count += 1
            if rep.scaler is not None:
                rep.scaler.update()
                if k in skipped[-1:]:
                    _check_scale(rep.scaler, plans, counts, finite[k], step_plan)
            samples[k] = counts
            step_s[k] = time.perf_counter() - t0
            step_end[k] = time.time()
            progress[0] = k + 1
            emitter.step(k, loss_sums[k], rows, step_s[k], step_end[k])
    rep.moved_on()
    final = module_to_state(rep.module, rep.optimizer) if rank == holder else None
    # every rank applied the same all-reduced gradients: their copies are compared. Buffers
    # too where they must agree: without sync_batchnorm, the last forward pass updated each
    # rank's BatchNorm statistics from its own slice (rank 0's are broadcast before the next)
    copy = fingerprint_of(params_vector(rep.module),
                          buffers_to_numpy(rep.module) if sync_batchnorm else {})
    return RankResult(rank, tuple(p.replica for p in plans), worker_address(), samples,
                      loss_sums, step_end, step_s, finite, tuple(skipped), t_start, final,
                      copy)


def _agreed_scaler(scaler, precision, device):
    """A fresh loss scaler at the smallest scale of any rank (ranks' scalers may differ:
    a rebuilt replica's starts afresh, a rank in DDP's ``join`` skips updates)."""
    scale = torch.tensor([scaler.get_scale()], device=device)
    torch.distributed.all_reduce(scale, op=torch.distributed.ReduceOp.MIN)
    return grad_scaler(precision, device, init_scale=float(scale.item()))


def device_options(device) -> dict:
    """DDP's ``device_ids`` for a module on a CUDA ``device`` (nothing on the CPU)."""
    if not is_cuda(device):
        return {}
    index = torch.device(device).index
    return {"device_ids": [torch.cuda.current_device() if index is None else index]}


#: Under fp16, the loss scale below which steps whose gradients are not finite fail the fit.
MIN_LOSS_SCALE = 2.0 ** -8


def _check_scale(scaler, plans, counts, own_finite: bool, plan) -> None:
    """Raise ``NonFiniteError`` once fp16's loss scale fell below :data:`MIN_LOSS_SCALE`.

    Under fp16 a step whose mean gradient is not finite may be an overflow
    of the scaled loss, which the scaler answers by halving the scale; ranks
    cannot tell that from a non-finite loss without another collective (which
    DDP's ``join`` would not shadow). The ranks agree on the scale when an
    epoch starts and then update it alike, so they all fail at the same step
    when the gradients keep being non-finite.
    """
    scale = scaler.get_scale()
    if scale >= MIN_LOSS_SCALE:
        return
    replicas = tuple(p.replica for p, n in zip(plans, counts) if n)
    error = NonFiniteError(
        f"Replica(s) {list(replicas)} kept producing non-finite gradients up to round "
        f"{plan.round} (epoch {plan.epoch}): fp16's loss scale fell to {scale:g}. The "
        "parameters are those of the last finite step; lower the learning rate, clip "
        "gradients, check the data or train in bf16.")
    error.daskdist_culprit = not own_finite
    raise error


def _stopped(abort, device) -> bool:
    """Whether the driver gave the epoch up, as rank 0 sees it, agreed by every rank."""
    flag = torch.zeros(1, device=device)
    if abort is not None:
        with contextlib.suppress(Exception):  # (a client going away: go on)
            flag += float(abort.is_set())
    torch.distributed.all_reduce(flag)
    return bool(flag.item())


def _count_skipped(skipped: int, plans, counts, own_finite: bool, plan) -> int:
    """Count a skipped step; raise ``NonFiniteError`` past the limit.

    Every rank raises at the same step; the error of a rank whose own loss
    was not finite (``daskdist_culprit``) names the replicas to blame.
    """
    replicas = tuple(p.replica for p, n in zip(plans, counts) if n)
    try:
        return check_non_finite(skipped, replicas, plan, count=1)
    except NonFiniteError as error:
        error.daskdist_culprit = not own_finite
        raise


class _Progress:
    """The rank-0 task's ``"round"`` events: the newest step, a few times a second."""

    def __init__(self, plan, step_rows, member, enabled: bool):
        self.plan, self.step_rows, self.enabled = plan, step_rows, enabled
        self.bytes = _allreduce_bytes(member.spec.world_size, _grad_nbytes(member))
        self.last = time.monotonic()
        self.t_start = time.time()

    def step(self, k, loss_sum, rows, seconds, t_end) -> None:
        now = time.monotonic()
        if not self.enabled or (now - self.last < EMIT_S and k + 1 < len(self.step_rows)):
            return
        total = self.step_rows[k]
        emit_from_worker(round_event(self.plan.run_id, {
            "round": self.plan.round + k, "epoch": self.plan.epoch, "samples": total,
            # the mean loss of rank 0's rows stands in for the step's (the epoch's log has all)
            "loss_sum": loss_sum / rows * total if rows else float("nan"),
            "bytes": self.bytes, "compute_s": seconds, "t_start": t_end - seconds,
            "t_end": t_end}))
        self.last = now


def _grad_nbytes(member) -> int:
    return 0 if member.wrapped is None else module_nbytes(member.wrapped[0])


def _allreduce_bytes(world: int, grad_nbytes: int) -> int:
    """Bytes all ranks send for one ring allreduce of the gradient: ``2 (W - 1) B``."""
    return 2 * (world - 1) * grad_nbytes


def finish_ranks(state: TrainingState, *results: RankResult, plan, world: int,
                 grad_nbytes: int, fetched: int) -> TrainingState:
    """The epoch's final state and round log from every rank's result.

    The ``daskdist-average`` task that ends a ``ddp`` epoch: one log record
    per step (its replicas, rows, loss, the ring allreduce's bytes; the
    first also counts the ``fetched`` copies of the starting state that
    ranks read from other workers), and the holder's parameters.
    """
    holder = next(r for r in results if r.state is not None)
    n = len(holder.loss_sums)
    step_bytes = _allreduce_bytes(world, grad_nbytes)
    records, skipped_total, applied = [], state.skipped, 0
    for k in range(n):
        rows = {rep: int(r.samples[k, j]) for r in results for j, rep in enumerate(r.replicas)}
        live = tuple(sorted(rep for rep, count in rows.items() if count))
        per_replica = []
        for r in results:
            rank_rows = int(r.samples[k].sum())
            for j, rep in enumerate(r.replicas):
                share = r.samples[k, j] / rank_rows if rank_rows else 0.0
                per_replica.append((rep, float(r.loss_sums[k] * share), int(r.samples[k, j]),
                                    float(r.step_s[k])))
        loss_sum = float(sum(r.loss_sums[k] for r in results))
        if k in holder.skipped:  # no update applied: the step's rows count for nothing
            bad = tuple(rep for r in results if not r.finite[k] for rep in r.replicas
                        if rows[rep])
            skip, live, loss_sum = bad or live, (), 0.0
            skipped_total += 1
        else:
            skip = ()
            applied += 1
        t_end = float(holder.step_end[k])
        records.append({
            "round": plan.round + k, "epoch": plan.epoch, "replicas": live, "skipped": skip,
            "samples": int(sum(rows[rep] for rep in live)), "steps": 1,
            "loss_sum": loss_sum,
            "bytes": step_bytes + (fetched * state.nbytes if k == 0 else 0),
            "compute_s": float(max(r.step_s[k] for r in results)),
            # the allreduce overlaps the backward pass: it has no time of its own
            "sync_s": float("nan"),
            "t_start": t_end - float(holder.step_s[k]), "t_end": t_end,
            "per_replica": tuple(per_replica),
        })
    prints = {r.rank: r.fingerprint for r in results if r.fingerprint is not None}
    if len(prints) > 1 and records:  # the ranks' copies, compared at the epoch's end
        reference = prints[min(prints)]
        worst = max(results, key=lambda r: float(np.max(np.abs(r.fingerprint - reference))))
        records[-1].update(drift=replica_drift(prints),
                           drift_worker=f"rank {worst.rank} on {worst.worker}")
    final = holder.state
    return TrainingState(
        params=final.params, buffers=final.buffers, optimizer=final.optimizer,
        step=state.step + applied, round=state.round + n, epoch=plan.epochs_completed(),
        skipped=skipped_total, log=(state.log if plan.first_step else ()) + tuple(records))


def module_nbytes(module) -> int:
    """Bytes of a module's trainable parameters (what an allreduce moves)."""
    return sum(p.numel() * p.element_size() for p in module.parameters() if p.requires_grad)


def failed_step(error) -> int:
    """Steps a failed rank had finished (0 if it failed before training)."""
    return getattr(error, "daskdist_step", 0)


def failed_at(error) -> float:
    """When a rank failed (wall time; infinity when unknown)."""
    return getattr(error, "daskdist_failed_at", float("inf"))


def blames_itself(error) -> bool:
    """Whether a rank's error is its own (its loss was the non-finite one, say)."""
    return getattr(error, "daskdist_culprit", True)
