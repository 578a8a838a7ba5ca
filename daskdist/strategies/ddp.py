"""``ddp``: torch ``DistributedDataParallel`` in a process group that Dask forms.

Each epoch the driver starts one long-running task per worker (a *rank*).
The ranks join a ``torch.distributed`` process group (gloo on CPU, NCCL on
GPU; :mod:`daskdist.worker.process_group` forms it through Dask and keeps it
between epochs) and train the worker's shards with
:class:`~torch.nn.parallel.DistributedDataParallel`: gradients are averaged
by the backend's allreduce during the backward pass, at its speed, with no
Dask task per step. Dask still builds and holds the shards, carries the
training state in and out of the epoch, reports progress (the rank-0 task
sends ``"round"`` events, a few per second) and checks workers' health.

The maths is that of ``sync``: every step each replica takes its slice of the
global batch (the same slices, shuffles and per-step seeds), and every rank
takes one optimizer step with the sample-weighted mean gradient of the
combined batch. DDP averages gradients over ranks, so each rank scales its
loss by ``rows * world_size / step_rows``; a rank whose shards are used up
before the others' stands in with zero gradients (DDP's ``join``). With
one replica per worker the result equals ``sync`` to float tolerance.
A worker holding several replicas' shards trains them as one rank, on their
step batches put together.

If a worker leaves during an epoch, the other ranks' collectives fail at once
(or after ``timeout`` seconds if the worker hangs); the driver forms a new
group on the remaining workers, re-sends the lost shards and runs the epoch
again from its starting state: the steps done in that epoch are lost
(``recoveries_`` counts them), never an earlier epoch.
"""

from __future__ import annotations

import contextlib
import os
import time
import zlib
from dataclasses import dataclass, replace

import dask
import numpy as np
import torch
from distributed.comm import get_address_host

from .._compat import workers as cluster_workers
from ..dashboard.events import emit_from_worker, round_event
from ..errors import WorkerLost
from ..state import TrainingState, grads_finite, module_to_state
from ..worker import process_group
from ..worker.aggregation import check_non_finite
from ..worker.devices import autocast, grad_scaler, is_cuda, to_device
from ..worker.replica import NonFiniteError, RoundPlan, _replica, _seed_round, _worker_address
from .base import Strategy

__all__ = ["DDP", "RankResult", "train_rank", "finish_ranks", "rank_layout", "device_options"]

#: Seconds between the rank-0 task's progress events.
EMIT_S = 0.25
#: Steps between the ranks' joint check that the driver still wants the epoch.
STOP_CHECK_STEPS = 32
#: Seconds between the driver's checks that every rank's worker is alive.
_LIVENESS_S = 1.0
#: Seconds the driver gives the other ranks to end after one failed.
_GRACE_S = 5.0


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

    def __sizeof__(self) -> int:
        state = 0 if self.state is None else self.state.nbytes
        arrays = (self.samples, self.loss_sums, self.step_end, self.step_s, self.finite)
        return object.__sizeof__(self) + state + sum(a.nbytes for a in arrays)


def rank_layout(replica_workers: list) -> list[tuple[str, tuple]]:
    """``(worker, replicas)`` of each rank: one rank per worker, in order of first replica."""
    ranks: dict = {}
    for replica, worker in enumerate(replica_workers):
        ranks.setdefault(worker, []).append(replica)
    return [(worker, tuple(replicas)) for worker, replicas in ranks.items()]


def _rows(size: int, batch: int, step: int) -> int:
    """Rows of a replica's slice of step ``step`` (0 once its shard is used up)."""
    return max(0, min(batch, size - step * batch))


def _batch(parts, device):
    """The step's batches of a rank's replicas, put together."""
    if len(parts) == 1:
        X, y = parts[0]
    else:
        X = torch.cat([X for X, _ in parts])
        y = None if parts[0][1] is None else torch.cat([y for _, y in parts])
    return to_device(X, device), to_device(y, device)


def train_rank(spec, state: TrainingState, *shards, group, rank: int, plans: tuple,
               step_rows: tuple, holder: int, common_steps: int, options: dict) -> RankResult:
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
    the same step if so. A failed rank's exception carries
    ``daskdist_rank``, ``daskdist_step`` and ``daskdist_failed_at``.
    """
    t_start = time.time()
    progress = [0]
    member = None
    try:
        member = process_group.join(group, rank)
        return _train(spec, state, shards, member, rank, plans, step_rows, holder,
                      common_steps, options, progress, t_start)
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
           progress, t_start) -> RankResult:
    first = plans[0]
    world = member.spec.world_size
    rep = _replica(spec, first.run_id, ("ddp", rank))
    rep.load(state)
    rep.set_lr(first.lr)
    rep.module.train()
    device = rep.device
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
                raise process_group.GroupAborted(
                    f"The driver gave up epoch {first.epoch}; rank {rank} stopped at step {k}.")
            parts = [next(b, None) for b in batches]
            counts = [0 if p is None else len(p[0]) for p in parts]
            rows = sum(counts)
            if not rows:
                if not uneven:
                    raise RuntimeError(f"Rank {rank} ran out of data at step {k} of {n}.")
                break  # DDP's join stands in for this rank in the remaining steps
            t0 = time.perf_counter()
            X, y = _batch([p for p in parts if p is not None], device)
            _seed_round(replace(first, round=first.round + k), device)
            rep.optimizer.zero_grad()
            with autocast(spec.precision, device):
                loss = spec.loss(model(X), y)
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
            step_plan = replace(first, round=first.round + k)
            if grads_finite(params):  # the mean gradient: the same on every rank
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
    return RankResult(rank, tuple(p.replica for p in plans), _worker_address(), samples,
                      loss_sums, step_end, step_s, finite, tuple(skipped), t_start, final)


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
    return 0 if member.wrapped is None else _module_nbytes(member.wrapped[0])


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
    final = holder.state
    return TrainingState(
        params=final.params, buffers=final.buffers, optimizer=final.optimizer,
        step=state.step + applied, round=state.round + n, epoch=plan.epochs_completed(),
        skipped=skipped_total, log=(state.log if plan.first_step else ()) + tuple(records))


def _is_communication_error(error) -> bool:
    """Whether a rank failed because the group broke (rather than in the user's code)."""
    if isinstance(error, (process_group.GroupAborted, TimeoutError, ConnectionError)):
        return True
    dist_error = getattr(torch.distributed, "DistError", ())
    if dist_error and isinstance(error, dist_error):
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and any(
        marker in text for marker in ("gloo", "Gloo", "NCCL", "Connection reset",
                                      "Connection closed", "Broken pipe"))


class DDP(Strategy):
    """Synchronous data parallelism in a ``torch.distributed`` process group.

    The same maths as ``sync`` (one optimizer step per global batch, with the
    sample-weighted mean gradient), but the gradients are averaged by gloo or
    NCCL inside :class:`~torch.nn.parallel.DistributedDataParallel` rather
    than through Dask futures, so a step costs an allreduce (about 1 ms plus
    3 ms per million parameters with gloo) instead of a Dask round (about
    20 ms plus 6–8 ms per million). One long-running task per worker trains
    its shards for a whole epoch; Dask forms the group, holds the shards and
    the state between epochs, and re-forms the group without a worker that
    leaves (the epoch in progress runs again).

    The process group's traffic is neither encrypted nor authenticated: on a
    cluster that uses TLS the strategy refuses to start unless
    ``allow_insecure=True``. Each worker must be its own process (a worker
    process belongs to one group at a time), so ddp fits on one cluster run
    one after the other. Differences from ``sync``: a step whose mean
    gradient is not finite is skipped as a whole (it counts as one skipped
    update); buffers (batch-norm statistics) are rank 0's, broadcast before
    each forward pass, rather than averaged; round checkpoints
    (``every_rounds``) are taken at epoch ends only.

    Parameters
    ----------
    backend : {None, "gloo", "nccl"}
        The process group's backend (None: NCCL when the model trains on
        CUDA, gloo otherwise).
    timeout : float
        Seconds a rendezvous or a collective may take before the epoch
        fails (and the group is formed again). It also bounds how long the
        other ranks wait when one fails in the user's code or hangs (gloo
        cannot interrupt a collective), so it is short by default; raise it
        for steps that take longer, or ranks that start far apart.
    bucket_cap_mb : float
        Size of DDP's gradient buckets, in MB.
    find_unused_parameters : bool
        Passed to DDP, for modules whose forward pass leaves some parameters
        out.
    allow_insecure : bool
        Start the (unencrypted) process group on a TLS cluster.
    """

    name = "ddp"

    def __init__(self, backend: str | None = None, timeout: float = 60.0,
                 bucket_cap_mb: float = 25.0, find_unused_parameters: bool = False,
                 allow_insecure: bool = False):
        self.backend = backend
        self.timeout = timeout
        self.bucket_cap_mb = bucket_cap_mb
        self.find_unused_parameters = find_unused_parameters
        self.allow_insecure = allow_insecure
        self.validate()

    def validate(self) -> None:
        if self.backend not in (None, "gloo", "nccl"):
            raise ValueError(f"backend must be None, 'gloo' or 'nccl', got {self.backend!r}.")
        for name in ("timeout", "bucket_cap_mb"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"{name} must be a positive number, got {value!r}.")

    def round_sizes(self, steps_per_epoch: int) -> list[int]:
        return [1] * steps_per_epoch

    def check_replicas(self, replica_workers: list[str]) -> None:
        schemes = {w.split("://", 1)[0] for w in replica_workers if "://" in w}
        if "inproc" in schemes:
            raise ValueError(
                "strategy='ddp' needs each worker in a process of its own (a process belongs "
                "to one torch.distributed group at a time); this cluster runs its workers in "
                "one process (processes=False). Start it with worker processes.")
        if "tls" in schemes and not self.allow_insecure:
            raise ValueError(
                "strategy='ddp' would send gradients through a torch.distributed process "
                "group, which is neither encrypted nor authenticated, outside this cluster's "
                "TLS. Pass strategy__allow_insecure=True to accept that on a trusted "
                "network, or use a strategy whose traffic stays in Dask's TLS (sync, "
                "local_sgd, hierarchical, async, ssp).")

    def backend_for(self, devices) -> str:
        """The backend for ranks on ``devices`` (one device, or each rank's).

        NCCL when every rank trains on CUDA, gloo otherwise.
        """
        if self.backend is not None:
            return self.backend
        devices = [devices] if isinstance(devices, (str, torch.device)) else list(devices)
        return "nccl" if devices and all(is_cuda(d) for d in devices) else "gloo"

    def ddp_options(self, device: str) -> dict:
        """Keyword arguments of ``DistributedDataParallel`` for a model on ``device``."""
        return {"bucket_cap_mb": float(self.bucket_cap_mb),
                "find_unused_parameters": bool(self.find_unused_parameters),
                **device_options(device)}

    def drive_epoch(self, trainer, lr, epoch_round: int) -> None:
        """Run one epoch in the process group; leave ``trainer._state`` as its final state."""
        _Epoch(self, trainer, lr, epoch_round).run()


class _Epoch:
    """The driver's side of one ``ddp`` epoch."""

    def __init__(self, strategy: DDP, trainer, lr, epoch_round: int):
        self.strategy, self.trainer, self.lr = strategy, trainer, lr
        self.client = trainer.client
        self.done = trainer.round - epoch_round  # steps the state already holds
        self.ranks = rank_layout(trainer.replica_workers)
        self.workers = [w for w, _ in self.ranks]

    def run(self) -> None:
        t = self.trainer
        steps = t.steps_per_epoch - self.done
        if steps <= 0:
            return
        group = self._group()
        futures = []
        try:
            futures = self._submit_ranks(group, steps)
            self._wait(futures, group)
        except BaseException:
            self._abort(group)
            for f in futures:
                f.release()
            raise

    # -- the group ------------------------------------------------------------------------
    def _group(self):
        """The group of this epoch's workers: the last epoch's, or a new one."""
        t = self.trainer
        old = getattr(t, "_ddp_group", None)
        if old is not None and old.members == tuple(self.workers):
            return old
        # a new key for every group the fit forms: a failed group is never joined again
        t._ddp_groups = getattr(t, "_ddp_groups", 0) + 1
        members = "|".join(self.workers).encode()
        key = f"{t.key_prefix}-{zlib.crc32(members):08x}-{t._ddp_groups}"
        self._check_processes()
        host = get_address_host(self.workers[0])
        timeout = float(self.strategy.timeout)
        future = self.client.submit(
            process_group.rendezvous, key, host, len(self.workers), timeout, pure=False,
            key=t.task_key("rendezvous", epoch=t.epoch), workers=[self.workers[0]],
            allow_other_workers=False)
        try:
            port = self._result(future)
        finally:
            future.release()
        spec = t.spec
        group = process_group.GroupSpec(key, t.run_id, host, int(port), len(self.workers),
                                        self.strategy.backend_for(
                                            [spec.placement.get(w, spec.device)
                                             for w in self.workers]), timeout,
                                        tuple(self.workers))
        t._ddp_group = group
        return group

    def _check_processes(self) -> None:
        """Refuse workers that share a process (two ranks cannot share a default group)."""
        pids = self.client.run(os.getpid, workers=self.workers, on_error="return")
        missing = [w for w in self.workers if not isinstance(pids.get(w), int)]
        if missing:
            self._lost(f"worker {missing[0]} is gone", 0)
        if len(set(pids.values())) < len(self.workers):
            raise ValueError(
                "strategy='ddp' needs each worker in a process of its own; workers "
                f"{self.workers} share processes {sorted(set(pids.values()))}.")

    def _result(self, future):
        """Wait for a pinned task, watching that its worker stays alive."""
        while True:
            done = self.trainer.wait([future], timeout=_LIVENESS_S)
            if done:
                return future.result()
            self._check_alive()

    def _check_alive(self) -> None:
        live = set(cluster_workers(self.client))
        gone = [(r, w) for r, w in enumerate(self.workers) if w not in live]
        if gone:
            rank, worker = gone[0]
            self._lost(f"worker {worker} (rank {rank}) left the ddp process group", 0)

    def _lost(self, reason: str, steps_lost: int):
        self.trainer._ddp_group = None
        raise WorkerLost(reason, steps_lost)

    def _abort(self, group) -> None:
        """Tell ranks still waiting or training in ``group`` to stop."""
        self.trainer._ddp_group = None
        try:
            from distributed import Event

            Event(process_group.abort_event_name(group.key), client=self.client).set()
        except Exception:  # a closing client: the ranks time out instead
            pass

    # -- the epoch ------------------------------------------------------------------------
    def _submit_ranks(self, group, steps: int) -> list:
        t = self.trainer
        first = self.done
        sizes, batches = t.shard_sizes, t.replica_batch
        step_rows = tuple(sum(_rows(sizes[i], batches[i], s) for i in range(len(sizes)))
                          for s in range(first, first + steps))
        rank_steps = [max(int(np.ceil(sizes[i] / batches[i])) for i in replicas) - first
                      for _, replicas in self.ranks]
        holder = rank_steps.index(max(rank_steps))
        max_non_finite = dask.config.get("daskdist.driver.max-non-finite")
        options = self.strategy.ddp_options("cpu")  # (each rank adds its own device)
        futures = []
        for rank, (worker, replicas) in enumerate(self.ranks):
            plans = tuple(
                _plan(t, i, first, steps, self.lr, max_non_finite) for i in replicas)
            futures.append(self.client.submit(
                train_rank, t.spec_future, t._state, *[t.shards[i] for i in replicas],
                group=group, rank=rank, plans=plans, step_rows=step_rows, holder=holder,
                common_steps=max(min(rank_steps), 0), options=options, pure=False,
                key=t.task_key("ddp", t.round, rank, epoch=t.epoch),
                workers=[worker], allow_other_workers=False))
        self.plan = _plan(t, self.ranks[0][1][0], first, steps, self.lr, max_non_finite)
        self.grad_nbytes = _module_nbytes(t.spec.module)
        return futures

    def _wait(self, futures: list, group) -> None:
        """Wait for every rank; on a failure, raise what the driver should do about it."""
        t = self.trainer
        # submitted now, so that it runs as soon as the last rank ends
        final = self.client.submit(
            finish_ranks, t._state, *futures, plan=self.plan, world=len(self.workers),
            grad_nbytes=self.grad_nbytes, fetched=len(self.workers) - 1, pure=False,
            key=t.task_key("average", t.round, epoch=t.epoch), workers=[self.workers[0]],
            allow_other_workers=True)
        futures = [*futures, final]
        pending = set(futures)
        while pending:
            pending -= t.wait(list(pending), return_when="FIRST_COMPLETED", timeout=_LIVENESS_S)
            if any(f.status != "finished" for f in futures if f not in pending):
                self._failed(futures[:-1], group)
            if pending:
                self._check_alive()
        t.round += t.steps_per_epoch - self.done
        t._state = t._latest = final
        t._track((t.round, final))

    def _failed(self, futures: list, group) -> None:
        """A rank failed: recover from a lost worker or a broken group, or raise its error.

        An error of the user's code is raised at once (the other ranks wait
        in their collective until the group's timeout, then end). A broken
        group (a peer's connection reset) is most often a worker that died:
        the driver gives the scheduler a few seconds to notice it, then forms
        a new group without it.
        """
        t = self.trainer
        errors = _errors(futures)
        if not any(_is_root_cause(e) for e in errors):
            # the other ranks fail too (the culprit of a non-finite step among them), or the
            # scheduler sees the dead worker leave
            t.wait(futures, timeout=_GRACE_S)
            errors = _errors(futures)
        self._abort(group)
        # the root cause first: a rank that blames itself, then the earliest to fail
        errors.sort(key=lambda e: (not getattr(e, "daskdist_culprit", True),
                                   getattr(e, "daskdist_failed_at", float("inf"))))
        own = [e for e in errors if not _is_communication_error(e)]
        if own:
            raise own[0]
        live = set(cluster_workers(self.client))
        steps = max((getattr(e, "daskdist_step", 0) for e in errors), default=0)
        gone = [(r, w) for r, w in enumerate(self.workers) if w not in live]
        if gone:
            rank, worker = gone[0]
            self._lost(f"worker {worker} (rank {rank}) left the ddp process group", steps)
        reason = f"the ddp process group failed ({errors[0]})" if errors else \
            "a ddp rank's result was lost"
        self._lost(reason, steps)


def _is_root_cause(error) -> bool:
    """An error of the user's code, raised by the rank it blames (if it blames one)."""
    return not _is_communication_error(error) and getattr(error, "daskdist_culprit", True)


def _errors(futures) -> list:
    """The exceptions of the futures that failed."""
    return [f.exception() for f in futures if f.status == "error"]


def _plan(t, replica: int, first: int, steps: int, lr, max_non_finite) -> RoundPlan:
    return RoundPlan(t.run_id, replica, t.epoch, t.round, first, steps, t.replica_batch[replica],
                     lr, t.random_state, t.shuffle, max_non_finite, t.steps_per_epoch)


def _module_nbytes(module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters() if p.requires_grad)
