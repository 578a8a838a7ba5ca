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
(or after ``timeout`` seconds if the worker hangs, or if they were waiting for
a rank that had failed); the driver waits for those ranks to end, forms a new
group on the remaining workers, re-sends the lost shards and runs the epoch
again from its starting state: the steps done in that epoch are lost
(``recoveries_`` counts them), never an earlier epoch.
"""


from __future__ import annotations

import logging
import time
import zlib

import numpy as np
import torch
from distributed.comm import get_address_host

from ..driver.driven import LIVENESS_S, DrivenEpoch
from ..worker import process_group
from ..worker.ddp_rank import (
    blames_itself,
    device_options,
    failed_at,
    failed_step,
    finish_ranks,
    module_nbytes,
    step_rows_of,
    train_rank,
)
from ..worker.devices import is_cuda
from ..worker.process_group import process_identity
from .base import Strategy

__all__ = ["DDP", "DDPEpoch", "rank_layout"]

#: Seconds the driver gives the other ranks to end after one failed.
_GRACE_S = 5.0
#: Seconds between the driver's checks while it gives them that time.
_GRACE_POLL_S = 0.25

logger = logging.getLogger(__name__)

def rank_layout(replica_workers: list) -> list[tuple[str, tuple]]:
    """``(worker, replicas)`` of each rank: one rank per worker, in order of first replica."""
    ranks: dict = {}
    for replica, worker in enumerate(replica_workers):
        ranks.setdefault(worker, []).append(replica)
    return [(worker, tuple(replicas)) for worker, replicas in ranks.items()]


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
        cannot interrupt a collective), and so how long a recovery or a
        failed fit takes, so it is short by default; raise it for steps that
        take longer, or ranks that start far apart.
    bucket_cap_mb : float
        Size of DDP's gradient buckets, in MB.
    find_unused_parameters : bool
        Passed to DDP, for modules whose forward pass leaves some parameters
        out.
    allow_insecure : bool
        Start the (unencrypted) process group on a TLS cluster.
    sync_batchnorm : bool
        Normalise with the statistics of the whole step's batch over every
        rank, in the forward and the backward pass, so that a fit equals
        single-process training on the combined batch (and every rank's
        running statistics are the combined batch's): daskdist's own
        synchronised BatchNorm on gloo and the CPU, torch's ``SyncBatchNorm``
        on CUDA (:mod:`daskdist.worker.sync_batchnorm`). Needs every rank to
        take every step of an epoch. Without it each rank normalises its own
        slice.
    """

    name = "ddp"

    def __init__(self, backend: str | None = None, timeout: float = 60.0,
                 bucket_cap_mb: float = 25.0, find_unused_parameters: bool = False,
                 allow_insecure: bool = False, sync_batchnorm: bool = False):
        self.backend = backend
        self.timeout = timeout
        self.bucket_cap_mb = bucket_cap_mb
        self.find_unused_parameters = find_unused_parameters
        self.allow_insecure = allow_insecure
        self.sync_batchnorm = sync_batchnorm
        self.validate()

    def validate(self) -> None:
        if self.backend not in (None, "gloo", "nccl"):
            raise ValueError(f"backend must be None, 'gloo' or 'nccl', got {self.backend!r}.")
        if not isinstance(self.sync_batchnorm, bool):
            raise ValueError(f"sync_batchnorm must be True or False, got {self.sync_batchnorm!r}.")
        for name in ("timeout", "bucket_cap_mb"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"{name} must be a positive number, got {value!r}.")

    def round_sizes(self, steps_per_epoch: int) -> list[int]:
        return [1] * steps_per_epoch

    def check_model(self, spec) -> None:
        from ..keras_models import KerasModule

        if isinstance(spec.module, KerasModule):
            raise ValueError(
                "strategy='ddp' trains torch modules with DistributedDataParallel, which does "
                "not see a Keras model's variables; train Keras models with sync, local_sgd, "
                "hierarchical, diloco, async or ssp.")

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

    def train_epoch(self, ctx) -> None:
        """Run one epoch in the process group."""
        DDPEpoch(self, ctx).run()


class DDPEpoch(DrivenEpoch):
    """The driver's side of one ``ddp`` epoch."""

    def __init__(self, strategy: DDP, ctx):
        super().__init__(strategy, ctx)
        self.ranks = rank_layout(ctx.info.replica_workers)
        self.workers = [w for w, _ in self.ranks]
        self.group = None

    def drive(self) -> None:
        info = self.ctx.info
        steps = info.steps_per_epoch - info.done
        if steps <= 0:
            self.ctx.finish(self.ctx.state, info.round)
            return
        self.group = self._group()
        futures = []
        try:
            futures = [self.hold(f) for f in self._submit_ranks(steps)]
            self._wait(futures, steps)
        except BaseException:
            self._abort()
            self._end_ranks(futures)
            raise

    # -- the group ------------------------------------------------------------------------
    def _group(self):
        """The group of this epoch's workers: the last epoch's, or a new one."""
        ctx, info = self.ctx, self.ctx.info
        old = ctx.scratch.get("group")
        if old is not None and old.members == tuple(self.workers):
            return old
        ctx.scratch["group"] = None
        # a new key for every group the fit forms: a failed group is never joined again
        ctx.scratch["groups"] = ctx.scratch.get("groups", 0) + 1
        members = "|".join(self.workers).encode()
        key = f"{info.attempt}-{zlib.crc32(members):08x}-{ctx.scratch['groups']}"
        self._check_processes()
        host = get_address_host(self.workers[0])
        timeout = float(self.strategy.timeout)
        future = ctx.submit(process_group.rendezvous, key, host, len(self.workers), timeout,
                            key=ctx.key("rendezvous"), worker=self.workers[0], queue=False,
                            strict=True)
        try:
            self.wait_alive(future, self._rank_workers())
            port = future.result()
        finally:
            future.release()
        model = info.model
        group = process_group.GroupSpec(key, info.run_id, host, int(port), len(self.workers),
                                        self.strategy.backend_for(
                                            [model.placement.get(w, model.device)
                                             for w in self.workers]), timeout,
                                        tuple(self.workers))
        ctx.scratch["group"] = group
        return group

    def _rank_workers(self) -> dict:
        return {f"rank {r} of the ddp process group": w for r, w in enumerate(self.workers)}

    def _check_processes(self) -> None:
        """Refuse workers that share a process (two ranks cannot share a default group)."""
        ids = self.ctx.client.run(process_identity, workers=self.workers, on_error="return")
        missing = [w for w in self.workers if not isinstance(ids.get(w), tuple)]
        if missing:
            self.ctx.lost(f"worker {missing[0]} is gone", 0)
        if len(set(ids.values())) < len(self.workers):
            raise ValueError(
                "strategy='ddp' needs each worker in a process of its own; workers "
                f"{self.workers} share processes {sorted(set(ids.values()))}.")

    def _end_ranks(self, futures: list) -> None:
        """Wait until the rank tasks of a group given up have ended; then let them go.

        A rank ends at its next check of the abort event, or when its
        collective fails: at once when a peer's process died, at the group's
        timeout at the latest; one whose task had not started yet ends as it
        starts (:func:`~daskdist.worker.process_group.join`). Releasing the
        futures does not stop a task that runs, so without this wait an old
        rank would keep its worker's thread: the next group's rank would
        queue behind it there while the other new ranks' rendezvous timed
        out, and a fit that fails would leave ranks running on the cluster.
        Ranks whose worker is gone are not waited for (they never end), nor
        is any rank for longer than the group's timeout and :data:`_GRACE_S`.
        """
        if self.group is None:
            return
        deadline = time.monotonic() + self.group.timeout + _GRACE_S
        left = []
        try:
            while True:
                live = set(self.ctx.live_workers())
                left = [f for f, (worker, _) in zip(futures, self.ranks)
                        if worker in live and not f.done()]
                if not left or time.monotonic() >= deadline:
                    break
                # (not ctx.wait: it raises again a Ctrl-C that is being handled)
                time.sleep(_GRACE_POLL_S)
        except Exception:  # a closing client: nothing left to wait with
            logger.debug("could not wait for the ranks of %s to end", self.group.key,
                         exc_info=True)
        finally:
            for f in futures:
                f.release()
        if left:
            logger.warning("daskdist run %s: ddp rank task(s) %s still running %g s after "
                           "their group was given up", self.ctx.info.run_id,
                           [f.key for f in left], self.group.timeout + _GRACE_S)

    def _grace(self, futures: list) -> None:
        """Wait :data:`_GRACE_S` at most until every rank on a live worker ended."""
        deadline = time.monotonic() + _GRACE_S
        while True:
            live = set(self.ctx.live_workers())
            left = [f for f, worker in zip(futures, self.workers)
                    if worker in live and not f.done()]
            remaining = deadline - time.monotonic()
            if not left or remaining <= 0:
                return
            self.ctx.wait(left, timeout=min(_GRACE_POLL_S, remaining))

    def _abort(self) -> None:
        """Tell ranks still waiting or training in the group to stop; form a new one next."""
        self.ctx.scratch["group"] = None
        if self.group is None:
            return
        try:
            from distributed import Event

            Event(process_group.abort_event_name(self.group.key), client=self.ctx.client).set()
        except Exception:  # a closing client: the ranks time out instead
            pass

    # -- the epoch ------------------------------------------------------------------------
    def _submit_ranks(self, steps: int) -> list:
        ctx, info = self.ctx, self.ctx.info
        first = info.done
        sizes, batches = info.shard_sizes, info.replica_batch
        self.step_rows = tuple(sum(step_rows_of(sizes[i], batches[i], s)
                                   for i in range(len(sizes)))
                               for s in range(first, first + steps))
        rank_steps = [max(int(np.ceil(sizes[i] / batches[i])) for i in replicas) - first
                      for _, replicas in self.ranks]
        holder = rank_steps.index(max(rank_steps))
        if self.strategy.sync_batchnorm and min(rank_steps) != max(rank_steps):
            raise ValueError(
                f"strategy__sync_batchnorm needs every rank to take every step, but the ranks' "
                f"shards give them {min(rank_steps)} to {max(rank_steps)} steps this epoch "
                f"(shards of {list(sizes)} samples, {list(batches)} per step): make the shards "
                "even (a number of samples that divides by the replicas and the batch)."
            )
        options = self.strategy.ddp_options("cpu")  # (each rank adds its own device)
        futures = []
        for rank, (worker, replicas) in enumerate(self.ranks):
            plans = tuple(ctx.plan(i, round=info.round, first_step=first, n_steps=steps)
                          for i in replicas)
            futures.append(ctx.submit(
                train_rank, ctx.spec, ctx.state, *[ctx.shards[i] for i in replicas],
                group=self.group, rank=rank, plans=plans, step_rows=self.step_rows,
                holder=holder, common_steps=max(min(rank_steps), 0), options=options,
                sync_batchnorm=self.strategy.sync_batchnorm,
                key=ctx.key("ddp", info.round, rank), worker=worker, queue=False, strict=True))
        self.plan = ctx.plan(self.ranks[0][1][0], round=info.round, first_step=first,
                             n_steps=steps)
        return futures

    def _wait(self, futures: list, steps: int) -> None:
        """Wait for every rank; on a failure, raise what the driver should do about it."""
        ctx, info = self.ctx, self.ctx.info
        # submitted now, so that it runs as soon as the last rank ends
        final = self.hold(ctx.submit(
            finish_ranks, ctx.state, *futures, plan=self.plan, world=len(self.workers),
            grad_nbytes=module_nbytes(info.model.module), fetched=len(self.workers) - 1,
            key=ctx.key("average", info.round), worker=self.workers[0], queue=False))
        everything = [*futures, final]
        pending = set(everything)
        while pending:
            pending -= ctx.wait(list(pending), return_when="FIRST_COMPLETED",
                                timeout=LIVENESS_S)
            if any(f.status != "finished" for f in everything if f not in pending):
                self._failed(futures)
            if pending:
                self.check_alive(self._rank_workers())
        ctx.track(info.round + steps, final)
        ctx.finish(final, info.round + steps)

    def _failed(self, futures: list) -> None:
        """A rank failed: recover from a lost worker or a broken group, or raise its error.

        An error of the user's code is raised once the other ranks ended
        (they wait in their collective until the group's timeout). A broken
        group (a peer's connection reset) is most often a worker that died:
        the driver gives the scheduler a few seconds to notice it, then forms
        a new group without it.
        """
        errors = _errors(futures)
        if not any(_is_root_cause(e) for e in errors):
            # the other ranks fail too (the culprit of a non-finite step among them), or the
            # scheduler sees the dead worker leave
            self._grace(futures)
            errors = _errors(futures)
        self._abort()
        # the root cause first: a rank that blames itself, then the earliest to fail
        errors.sort(key=_blame_order)
        own = [e for e in errors if not process_group.is_communication_error(e)]
        if own:
            raise own[0]
        steps = max((failed_step(e) for e in errors), default=0)
        live = set(self.ctx.live_workers())
        for rank, worker in enumerate(self.workers):
            if worker not in live:
                self.ctx.lost(f"worker {worker} (rank {rank}) left the ddp process group", steps)
        reason = f"the ddp process group failed ({errors[0]})" if errors else \
            "a ddp rank's result was lost"
        self.ctx.lost(reason, steps)


def _is_root_cause(error) -> bool:
    """An error of the user's code, raised by the rank it blames (if it blames one)."""
    return not process_group.is_communication_error(error) and blames_itself(error)


def _blame_order(error) -> tuple:
    return (not blames_itself(error), failed_at(error))


def _errors(futures) -> list:
    """The exceptions of the futures that failed."""
    return [f.exception() for f in futures if f.status == "error"]
