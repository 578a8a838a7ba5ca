"""The driver: shards → rounds → aggregation → epochs, through Dask futures.

:class:`Trainer` is the engine behind the estimators and is usable on its own::

    trainer = Trainer(client, spec, LocalSGD(sync_every=8), batch_size=256)
    trainer.start(X, y, initial_state)
    for epoch in range(10):
        result = trainer.run_epoch(lr=0.05)
    state = trainer.state()
    trainer.close()

The driver only moves futures: it plans shards, submits each round's replica
tasks and aggregation tree a few rounds ahead of the workers (so they never
wait on the client between rounds), and lets go of old rounds' futures so the
task graph does not grow with the run. Epoch boundaries are synchronisation
points: the state comes back to the client there, and the learning rate for the
next epoch's rounds is read then.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
import warnings
from collections import deque
from dataclasses import dataclass, field, replace

import dask
import distributed
import numpy as np
from dask.delayed import Delayed
from distributed import Future, KilledWorker
from distributed.client import FutureCancelledError, FuturesCancelledError

from .. import interrupt
from .._compat import reschedule_stranded, task_state
from .._compat import workers as cluster_workers
from ..data.sharding import holdout_split
from ..data.sources import as_source
from ..errors import ShardFailedError, StateLost, WorkerLost
from ..spec import ModelSpec
from ..state import TrainingState
from ..worker.devices import is_cuda, plan_devices, worker_info
from ..worker.replica import RoundPlan, drop_run, evaluate

__all__ = ["Trainer", "EpochResult", "ShardFailedError", "ROUND_COLUMNS", "RECOVERY_COLUMNS"]

logger = logging.getLogger(__name__)

#: Columns of the ``rounds_`` table: one row per synchronisation round.
ROUND_COLUMNS = ("round", "epoch", "replicas", "skipped", "samples", "loss", "bytes", "sync_s",
                 "compute_s", "staleness", "dropped")
#: Columns of the ``recoveries_`` table: one row per recovery from a lost worker
#: (the epoch, the round counter training went on from, finished rounds that
#: had to be run again, and what was lost).
RECOVERY_COLUMNS = ("epoch", "round", "rounds_lost", "reason")


@dataclass
class EpochResult:
    """What one epoch produced, as the client sees it."""

    epoch: int
    state: TrainingState
    train_loss: float
    samples: int
    rounds: list
    duration: float
    valid: dict = field(default_factory=dict)

    @property
    def samples_per_sec(self) -> float:
        """Training samples per second of wall time."""
        return self.samples / self.duration if self.duration else float("nan")


def _shard_sizes(shard):
    return len(shard), shard.n_valid


class Trainer:
    """Data-parallel training of one model on a Dask cluster.

    Parameters
    ----------
    client : distributed.Client
        The client to submit through (passed explicitly; never looked up).
    spec : ModelSpec
        What each replica trains.
    strategy : daskdist.strategies.Strategy
        How replicas synchronise.
    batch_size : int
        The global batch per step, split across replicas (the remainder goes
        to the first replicas).
    n_replicas : int, optional
        Replicas; default one per worker.
    sharding : {"random", "sequential", "stratified"}
        Shard plan.
    random_state : int
        Seed of shard plans, shuffles and per-round torch seeds.
    shuffle : bool
        Reshuffle each shard every epoch.
    holdout : float or None
        Fraction of each shard held out for validation.
    stratify : bool
        Keep class proportions in the hold-out.
    shard_kwargs : dict
        Passed to :func:`daskdist.data.shards.make_shard` (preprocessor, dtypes,
        classes).
    lookahead : int, optional
        Rounds submitted ahead of the last finished one (config
        ``daskdist.driver.lookahead``).
    direct_scatter : bool, optional
        Send numpy shards straight to workers (config
        ``daskdist.shards.direct-scatter``).
    streaming : {"auto", True, False}
        Stream dask shards chunk by chunk instead of keeping them in worker
        memory (:mod:`daskdist.data.streaming`); ``"auto"`` streams when they
        would not fit.
    buffer_chunks : int
        Chunks a streaming replica shuffles together.
    """

    def __init__(self, client, spec: ModelSpec, strategy, *, batch_size: int,
                 n_replicas: int | None = None, sharding: str = "random", random_state: int = 0,
                 shuffle: bool = False, holdout: float | None = None, stratify: bool = False,
                 shard_kwargs: dict | None = None, lookahead: int | None = None,
                 direct_scatter: bool | None = None, streaming="auto", buffer_chunks: int = 4):
        self.client = client
        self.spec = spec
        self.strategy = strategy
        self.batch_size = int(batch_size)
        self.n_replicas = n_replicas
        self.sharding = sharding
        self.random_state = int(random_state)
        self.shuffle = bool(shuffle)
        self.holdout = holdout
        self.stratify = stratify
        self.shard_kwargs = dict(shard_kwargs or {})
        self.lookahead = int(lookahead if lookahead is not None
                             else dask.config.get("daskdist.driver.lookahead"))
        self.direct_scatter = (direct_scatter if direct_scatter is not None
                               else dask.config.get("daskdist.shards.direct-scatter"))
        self.streaming = streaming
        self.buffer_chunks = buffer_chunks
        self.run_id = uuid.uuid4().hex[:10]
        self.epoch = 0
        self.round = 0
        self.rounds_: list[dict] = []
        self._inflight: deque = deque()
        self._queued: list = []
        self._placement: dict = {}
        self._latest = None
        self._state = None
        # (round, future) of the two newest settled round outputs. Two, because a
        # round's state lives on one worker (the root of its average rotates
        # over the workers): when that worker dies, the round before it is
        # still held by another, and a recovery loses one finished round.
        self._settled: deque = deque(maxlen=2)
        self._generation = 0
        self._epoch_round = 0  # the round the current epoch started at
        self._shard_losses: list[int] = []
        #: ``(every, fn)`` pairs: ``fn(state)`` gets the state of every
        #: ``every``-th round as the driver sees it finish (round checkpoints).
        self.round_hooks: list = []
        self.shards = []
        #: One record per recovery from a lost worker (see :meth:`run_epoch`).
        self.recoveries: list[dict] = []

    # -- set-up -------------------------------------------------------------------------------
    def start(self, X, y, state: TrainingState) -> Trainer:
        """Plan and place the shards, and send the model and initial state.

        Parameters
        ----------
        X, y : numpy.ndarray or dask.array.Array
            Training data; numpy shards are sent to their workers, dask shards
            are assembled on them from the chunks.
        state : TrainingState
            Where training starts.
        """
        self.source = as_source(X, y, direct=self.direct_scatter, streaming=self.streaming,
                                buffer_chunks=self.buffer_chunks)
        self._wait_for_a_worker()
        self._plan_devices()
        workers = sorted(cluster_workers(self.client))
        n = self.n_replicas or self.strategy.replicas_for(len(workers))
        self.strategy.check_model(self.spec)
        self.replica_workers = self.strategy.place_replicas(workers, n)
        self.replica_batch = [self.batch_size // n + (1 if i < self.batch_size % n else 0)
                              for i in range(n)]
        if min(self.replica_batch) < 1:
            raise ValueError(
                f"batch_size={self.batch_size} is smaller than the number of replicas ({n}); "
                "every replica needs at least one sample per step."
            )
        self.strategy.check_replicas(self.replica_workers)
        plan = self.source.plan(n, self.sharding, random_state=self.random_state)
        self.plan = plan
        self.valid_positions = self._client_holdout(plan)
        preferred = self.source.prepare(self.client, plan, run_id=self.run_id,
                                        workers=self.replica_workers)
        if preferred:  # the data is already on workers: train each shard where it is
            self.replica_workers = preferred
        self.spec_future = self._submit_spec()
        self.shards = [self._submit_shard(i) for i in range(n)]
        self._shard_losses = [0] * n
        sizes = self._gather_shard_sizes()
        self.shard_sizes = [s[0] for s in sizes]
        self.valid_sizes = [s[1] for s in sizes]
        if min(self.shard_sizes) < 1:
            raise ValueError("A shard has no training samples left after the hold-out split.")
        self.steps_per_epoch = max(int(np.ceil(s / b))
                                   for s, b in zip(self.shard_sizes, self.replica_batch))
        # Counters continue from the state, so that shuffles and per-round
        # seeds of a continued (or resumed) fit are those of an uninterrupted one.
        # A state saved mid-epoch logs the rounds its epoch has done so far.
        self.epoch, self.round = state.epoch, state.round
        self._epoch_round = state.round - sum(1 for r in state.log if r["epoch"] == state.epoch)
        self.set_state(state)
        self._epoch_state = state
        logger.info("daskdist run %s: %d replicas on %d workers, shards of %s samples%s",
                    self.run_id, n, len(set(self.replica_workers)), self.shard_sizes,
                    f", streamed with a buffer of {self.buffer_chunks} chunks"
                    if getattr(self.source, "streaming", False) else "")
        return self

    def _plan_devices(self) -> None:
        """Give each worker its device for ``spec.device`` (its own GPU for ``"cuda"``)."""
        if not is_cuda(self.spec.device):
            return
        infos = self.client.run(worker_info)
        placement, fallback = plan_devices(self.spec.device, infos)
        if fallback:
            warnings.warn(
                f"device={self.spec.device!r}: {len(fallback)} of {len(infos)} workers have "
                f"no CUDA device ({', '.join(fallback[:3])}{', ...' if len(fallback) > 3 else ''}"
                "); replicas there train on their CPU.", UserWarning, stacklevel=3)
        self.spec = replace(self.spec, placement=placement)
        logger.info("daskdist run %s: devices %s", self.run_id, placement)

    def _gather_shard_sizes(self) -> list:
        """Wait for the shards to be built; re-send those lost with a worker."""
        while True:
            sizes = [self.client.submit(_shard_sizes, shard, pure=False,
                                        key=self.task_key("size", i))
                     for i, shard in enumerate(self.shards)]
            try:
                self.wait(sizes)  # (a lost shard makes the gather raise)
                return self.client.gather(sizes)
            except KilledWorker as error:
                raise self._shard_failed(error) from error
            except FutureCancelledError:
                if not self._lost_shards():
                    raise
                self._count_shard_losses("while the shards were built")
                self._replace_lost_shards()
            finally:
                _release(sizes)

    def _lost_shards(self) -> list[int]:
        return [i for i, f in enumerate(self.shards) if f.status in _LOST]

    def _count_shard_losses(self, reason) -> None:
        """Count workers lost, per shard, in a row; raise on a poison shard."""
        lost = self._lost_shards()
        self._shard_losses = [(count + 1) if i in lost else 0
                              for i, count in enumerate(self._shard_losses)]
        allowed = dask.config.get("distributed.scheduler.allowed-failures")
        worst = max(range(len(self.shards)), key=self._shard_losses.__getitem__)
        if self._shard_losses[worst] > allowed:
            raise ShardFailedError(
                f"The workers holding shard {worst} ({len(self.plan[worst])} samples) died "
                f"{self._shard_losses[worst]} times in a row ({reason}): a task of that shard "
                "seems to kill its worker (out of memory, or a crash in compiled code on some "
                "rows). Training stopped; the cluster is still usable "
                "(distributed.scheduler.allowed-failures).", worst)

    def _shard_failed(self, error: KilledWorker) -> ShardFailedError:
        """Name the shard behind a task Dask gave up on."""
        match = _SHARD_TASK.match(str(error.task))
        replica = int(match.group(1)) if match else None
        what = "a task of this fit" if replica is None else f"shard {replica}"
        return ShardFailedError(
            f"Task {error.task!r} ({what}) killed {error.allowed_failures + 1} workers in a "
            "row, so Dask gave up on it (distributed.scheduler.allowed-failures): its data "
            "seems to crash the worker process (out of memory, or a crash in compiled code). "
            "Training stopped; the cluster is still usable.", replica)

    @property
    def key_prefix(self) -> str:
        """Run id and recovery generation, shared by this run's task keys."""
        return f"{self.run_id}-{self._generation}"

    def task_key(self, kind: str, *index: int, epoch: int | None = None) -> tuple:
        """The key of a task of this run.

        That is ``("daskdist-<kind>-<run>-<generation>[-e<epoch>]", *index)``.
        Tuple keys put each run's (and each epoch's) tasks of one kind in a
        task group of their own, which the dashboard's spans are made of; the
        task prefix, ``daskdist-<kind>``, names the kind of work.
        """
        name = f"daskdist-{kind}-{self.key_prefix}" + ("" if epoch is None else f"-e{epoch}")
        return (name, *(int(i) for i in index))

    def _submit_spec(self):
        return self.client.submit(_identity, self.spec, pure=False,
                                  key=f"daskdist-spec-{self.key_prefix}")

    def _submit_shard(self, i: int):
        valid = None if self.valid_positions is None else self.valid_positions[i]
        return self.source.submit_shard(
            self.client, i, self.plan[i], self.replica_workers[i],
            run_id=self.key_prefix, valid_positions=valid,
            holdout=self.holdout, stratify=self.stratify, seed=self.random_state + i,
            **self.shard_kwargs)

    def _client_holdout(self, plan):
        """Hold-out rows chosen on the client, when the labels are already here."""
        if not self.holdout or self.source.lazy:
            return None
        labels = self.source.labels() if self.stratify else None
        return [holdout_split(len(rows), self.holdout,
                              labels=None if labels is None else labels[rows],
                              random_state=self.random_state + i)[1]
                for i, rows in enumerate(plan)]

    def valid_rows(self) -> np.ndarray | None:
        """Source rows held out for validation (client-side hold-outs only)."""
        if self.valid_positions is None:
            return None
        return np.concatenate([rows[v] for rows, v in zip(self.plan, self.valid_positions)])

    def set_state(self, state: TrainingState) -> None:
        """Continue from ``state`` (sent from the client)."""
        # The state travels inside the task, not scattered: the scheduler can then
        # compute it again if the worker holding it dies. Dask warns about large
        # graphs (a model of millions of parameters), which here is deliberate.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Sending large graph")
            self._state = self.client.submit(
                _identity, state, key=f"daskdist-state-{self.key_prefix}-{self.round}",
                pure=False)
        self._settled.clear()
        self._settled.append((state.round, self._state))

    # -- rounds ---------------------------------------------------------------------------------
    def submit(self, func, *args, key: str, worker: str, **kwargs):
        """Queue the task ``func(*args, **kwargs)`` for the next :meth:`flush`.

        The task is placed on ``worker`` and may run elsewhere if that worker
        is gone. Returns a placeholder (a :class:`dask.delayed.Delayed`) that
        later tasks of the same flush take as an argument; strategies submit
        through here so that several rounds reach the scheduler as one graph.
        """
        task = dask.delayed(func, pure=False)(*args, dask_key_name=key, **kwargs)
        self._queued.append(task)
        self._placement[key] = [worker]
        return task

    def flush(self, strict: bool = False) -> dict:
        """Send the queued tasks to the scheduler as one graph; return their futures by key.

        With ``strict``, each task runs on its worker only (for tasks that
        need what an earlier task left in that worker's memory); otherwise it
        may run elsewhere when its worker is gone or busy.
        """
        if not self._queued:
            return {}
        # The placement travels as a callable annotation (key -> workers); it
        # is a builtin dict method, so the scheduler needs nothing of ours.
        with dask.annotate(workers=self._placement.__getitem__,
                           allow_other_workers=not strict):
            futures = self.client.compute(self._queued, optimize_graph=False)
        self._queued, self._placement = [], {}
        return {f.key: f for f in futures}

    def submit_replicas(self, task, state, plans):
        """Queue ``task(spec, shard, state, plan)`` on every replica's worker.

        ``state`` is the state every replica starts from, or a list of one
        (copy of it) per plan.
        """
        states = state if isinstance(state, list) else [state] * len(plans)
        return [
            self.submit(task, self.spec_future, self.shards[p.replica], s, p,
                        key=self.task_key("round", p.round, p.replica, epoch=p.epoch),
                        worker=self.replica_workers[p.replica])
            for p, s in zip(plans, states)
        ]

    def _submit_epoch(self, lr, epoch_round: int) -> None:
        """Submit the epoch's rounds not yet done, settling old ones as it goes.

        ``epoch_round`` is the round the epoch started at: after a recovery the
        current state already holds ``self.round - epoch_round`` of its rounds.
        ``self._state`` ends as the future of the epoch's final state.
        """
        state = self._state
        tracked = []
        # Rounds go to the scheduler in graphs of half the look-ahead: fewer,
        # larger graphs cost the client and the scheduler less per task.
        per_flush = max(1, self.lookahead // 2)
        sizes = self.strategy.round_sizes(self.steps_per_epoch)
        max_non_finite = dask.config.get("daskdist.driver.max-non-finite")
        done = self.round - epoch_round
        first, plans = sum(sizes[:done]), None
        for steps in sizes[done:]:
            plans = [RoundPlan(self.run_id, i, self.epoch, self.round, first, steps,
                               self.replica_batch[i], lr, self.random_state, self.shuffle,
                               max_non_finite, self.steps_per_epoch,
                               getattr(self.strategy, "compression", None),
                               getattr(self.strategy, "density", 0.01))
                     for i in range(len(self.shards))]
            state = self.strategy.submit_round(self, state, plans)
            tracked.append((self.strategy.state_round(self.round),
                            self.strategy.tracked(state)))
            first += steps
            self.round += 1
            if len(tracked) == per_flush:
                state = self._flush_rounds(state, tracked)
                tracked.clear()
        if plans is None:  # the state already holds every round of the epoch
            return
        self._state = self.strategy.finish_epoch(self, state, plans)
        self._state = self._flush_rounds(self._state, tracked)

    def _flush_rounds(self, state, tracked):
        """Send queued rounds; track their futures; return ``state`` as futures."""
        interrupt.raise_if_interrupted()
        futures = self.flush()
        # the newest outputs, until the next flush (not all of them are tracked)
        self._latest = _resolve(state, futures)
        for state_round, output in tracked:
            self._track((state_round, _resolve(output, futures)))
        return self._latest

    def _track(self, item) -> None:
        self._inflight.append(item)
        while len(self._inflight) > self.lookahead:
            self._settle(self._inflight.popleft())

    def _settle(self, item) -> None:
        """Wait for a tracked round output; raise if it failed or was lost."""
        interrupt.raise_if_interrupted()
        _, future = item
        try:
            error = self._wait(future)
        except FutureCancelledError:
            error = None
        if future.status in _LOST:
            raise WorkerLost(f"training state {future.key} was lost with a worker")
        if isinstance(error, StateLost):
            raise WorkerLost(str(error))
        if isinstance(error, KilledWorker):
            raise self._shard_failed(error) from error
        if error is not None:
            raise error
        self._settled.append(item)
        if self.round_hooks:
            self._call_round_hook(item)

    def _wait(self, future):
        """``future.exception()``, which also returns once the scheduler has given the key up.

        A future whose data went with a worker is "lost" until the scheduler
        computes it again, and waiting on it blocks until then; when its
        inputs were let go too, the scheduler forgets it and that is never.
        """
        while True:
            try:
                return future.exception(timeout=_POLL_S)  # waits without fetching the state
            except TimeoutError:
                interrupt.raise_if_interrupted()
                if future.status in _LOST and not self._coming(future.key):
                    return None
                self._reschedule_stranded()

    def wait(self, futures, return_when: str = "ALL_COMPLETED",
             timeout: float | None = None) -> set:
        """Wait for all (or the first) of ``futures``; return those done.

        Futures lost with a worker count as done (their status says so).
        While waiting, this run's tasks stranded for dead workers are
        rescheduled. After ``timeout`` seconds (None: no limit) returns those
        done so far, maybe none. A safe point for Ctrl-C: an interrupt that a
        finalizer swallowed meanwhile is raised here, however the wait ends.
        """
        end = None if timeout is None else time.monotonic() + timeout
        while True:
            interrupt.raise_if_interrupted()
            poll = _POLL_S if end is None else min(_POLL_S, max(end - time.monotonic(), 0.0))
            try:
                with self.client.as_current():
                    done, _ = distributed.wait(futures, timeout=poll, return_when=return_when)
            except FuturesCancelledError:
                done = {f for f in futures if f.status != "pending"}
            except TimeoutError:
                if end is None or time.monotonic() < end:
                    self._reschedule_stranded()
                    continue
                done = {f for f in futures if f.done()}
            interrupt.raise_if_interrupted()
            return done

    def _reschedule_stranded(self) -> None:
        """Get this run's tasks out of ``no-worker`` when they wait for workers that are gone.

        That happens to a task recomputed while no worker was running (every
        worker died at once, and new ones came): the scheduler would keep it
        waiting for its old worker (:func:`daskdist._compat.reschedule_stranded`).
        """
        keys = self.client.run_on_scheduler(reschedule_stranded, f"-{self.run_id}-")
        if keys:
            logger.warning("daskdist run %s: rescheduled %d task(s) that waited for workers "
                           "that are gone: %s", self.run_id, len(keys), keys[:4])

    def _coming(self, key) -> bool:
        """Whether the scheduler is computing ``key`` (again)."""
        return self.client.run_on_scheduler(task_state, key) in _COMING

    def _call_round_hook(self, item) -> None:
        """Hand the state of a settled round to the :attr:`round_hooks` that want it."""
        state_round, future = item
        wanted = [fn for every, fn in self.round_hooks if state_round % every == 0]
        if not wanted or state_round == self._epoch_state.round:
            return  # (the epoch's starting state was handed over at the epoch's end)
        state = self._read_state(future)
        if state is None or state.round != state_round:
            return  # gone with a worker: the next one will do
        for fn in wanted:
            fn(state)

    def run_epoch(self, lr) -> EpochResult:
        """Train one epoch and return its result (state and statistics).

        If a worker is lost and takes with it data that Dask cannot recompute
        (shards sent from the client, the newest round's state), the driver
        recovers: it stops the rounds in flight, re-sends the lost shards to
        live workers, and continues the epoch from the newest round whose
        state is still held by a live worker — so at most the round in
        progress is lost, and every round's update is applied once. Each
        recovery is recorded in :attr:`recoveries`; at most
        ``daskdist.driver.recoveries`` happen per epoch.

        Parameters
        ----------
        lr : float or tuple of float
            Learning rate of every round in the epoch (one per parameter group).
        """
        limit = dask.config.get("daskdist.driver.recoveries")
        epoch_round, epoch_state = self._epoch_round, self._epoch_state
        t0 = time.perf_counter()
        for attempt in range(limit + 1):
            try:
                return self._run_epoch_once(lr, epoch_round, t0)
            except WorkerLost as lost:
                if attempt == limit:
                    raise RuntimeError(
                        f"Epoch {self.epoch} lost workers {limit + 1} times ({lost}); giving up "
                        "(daskdist.driver.recoveries)."
                    ) from None
                self._recover(lost, epoch_round, epoch_state)
        raise AssertionError("unreachable")

    def _recover(self, lost, epoch_round: int, epoch_state: TrainingState) -> None:
        """Continue from the newest state a live worker still holds."""
        self._count_shard_losses(str(lost))
        # the newest round known to have finished: settled ones count even if lost since
        newest = max([r for r, _ in self._settled]
                     + [r for r, f in self._inflight if f.status == "finished"], default=None)
        state = self._newest_state()  # also stops the rounds in flight
        if state is None or state.round < epoch_round:
            state = epoch_state
        # (a strategy that runs an epoch's rounds inside one task says how many it lost)
        lost_rounds = lost.rounds_lost
        if lost_rounds is None:
            lost_rounds = max((newest or state.round) - state.round, 0)
        record = {"epoch": self.epoch, "round": state.round, "rounds_lost": lost_rounds,
                  "reason": str(lost)}
        self.recoveries.append(record)
        logger.warning("daskdist run %s: %s; continuing epoch %d from round %d (%d finished "
                       "rounds lost)", self.run_id, lost, self.epoch, state.round,
                       record["rounds_lost"])
        self._replace_lost_shards()
        self.round = state.round
        self.set_state(state)

    def _run_epoch_once(self, lr, epoch_round: int, t0: float) -> EpochResult:
        try:
            drive = getattr(self.strategy, "drive_epoch", None)
            if drive is not None:  # the strategy runs the epoch's loop itself
                drive(self, lr, epoch_round)
            else:
                self._submit_epoch(lr, epoch_round)
            while self._inflight:
                self._settle(self._inflight.popleft())
            try:  # an untracked round of the last ones may have lost its replica's state
                final = self._state.result()
            except StateLost as lost:
                raise WorkerLost(str(lost)) from None
        except BaseException:  # interrupted, or a worker lost: stop the newest rounds too
            _release(self._latest)
            raise
        result = replace(final, epoch=self.epoch + 1)
        duration = time.perf_counter() - t0
        log = list(result.log)
        samples = sum(r["samples"] for r in log)
        epoch = EpochResult(
            epoch=self.epoch, state=result,
            train_loss=sum(r["loss_sum"] for r in log) / max(samples, 1),
            samples=samples, rounds=self.round_rows(result), duration=duration,
        )
        skipped = [(r["round"], r["skipped"]) for r in epoch.rounds if r["skipped"]]
        if skipped:
            logger.warning("daskdist run %s, epoch %d: non-finite updates left out of the "
                           "average (round, replicas): %s", self.run_id, self.epoch, skipped)
        if self.holdout:
            epoch.valid = self.evaluate()
        self.rounds_.extend(epoch.rounds)
        self.epoch += 1
        self._epoch_state, self._epoch_round = result, self.round
        return epoch
    def _wait_for_a_worker(self) -> None:
        """Wait until the cluster has a worker (``daskdist.driver.worker-timeout`` at most)."""
        timeout = dask.config.get("daskdist.driver.worker-timeout")
        try:
            self.client.wait_for_workers(1, timeout=timeout)
        except TimeoutError:
            raise RuntimeError(
                f"The Dask cluster has had no workers for {timeout}; cannot train on it."
            ) from None

    def _replace_lost_shards(self) -> None:
        """Re-send shards whose data was lost with a worker; move replicas off dead workers."""
        self._wait_for_a_worker()
        live = sorted(cluster_workers(self.client))
        self._generation += 1
        for i, future in enumerate(self.shards):
            if self.replica_workers[i] not in live:
                self.replica_workers[i] = live[i % len(live)]
            if future.status in _LOST:
                self.shards[i] = self._submit_shard(i)
        if self.spec_future.status in _LOST:
            self.spec_future = self._submit_spec()

    @staticmethod
    def round_rows(state: TrainingState) -> list[dict]:
        """Rows of the ``rounds_`` table for the rounds logged in ``state``."""
        rows, prev_end = [], None
        for r in state.log:
            start = r["t_start"] if prev_end is None else prev_end
            span = max(r["t_end"] - start, 0.0)
            rows.append({
                "round": r["round"], "epoch": r["epoch"], "replicas": r["replicas"],
                "skipped": r.get("skipped", ()),
                "samples": r["samples"],
                "loss": r["loss_sum"] / r["samples"] if r["samples"] else float("nan"),
                "bytes": r["bytes"],
                "sync_s": r["sync_s"] if "sync_s" in r else max(span - r["compute_s"], 0.0),
                "compute_s": r["compute_s"],
                # versions applied since the update's replica started (0: all replicas met)
                "staleness": r.get("staleness", 0),
                # updates that missed this round's deadline (applied in a later round)
                "dropped": r.get("dropped", 0),
            })
            prev_end = r["t_end"]
        return rows

    def evaluate(self) -> dict:
        """Loss (and accuracy) of the current state on every shard's hold-out."""
        futures = [
            self.client.submit(
                evaluate, self.spec_future, shard, self._state, self.run_id,
                max(self.batch_size, 1), key=self.task_key("valid", i, epoch=self.epoch),
                workers=[self.replica_workers[i]], allow_other_workers=True, pure=False)
            for i, shard in enumerate(self.shards)
        ]
        parts = self.client.gather(futures)
        n = sum(p["n"] for p in parts)
        if not n:
            return {}
        out = {"loss": sum(p["loss_sum"] for p in parts) / n, "n": n}
        if self.spec.classifier:
            out["acc"] = sum(p["correct"] for p in parts) / n
        return out

    # -- results and tear-down ---------------------------------------------------------------
    def state(self) -> TrainingState:
        """The latest training state (waits for rounds in flight)."""
        return self._state.result()

    def stop(self) -> TrainingState | None:
        """Cancel the rounds in flight; return the state of the last finished round.

        Returns ``None`` when no round of this run finished (or none can be
        read back any more).
        """
        return self._newest_state()

    def _held(self) -> list:
        """``(state round, future)`` of the round outputs the driver holds, oldest first."""
        return [*self._settled, *self._inflight]

    def _newest_state(self) -> TrainingState | None:
        """Stop the rounds in flight; read back the newest finished round's state."""
        finished = [f for _, f in reversed(self._held()) if f.status == "finished"]
        self.cancel()  # frees the workers; ``finished`` keeps those results alive
        for future in finished:
            state = self._read_state(future)
            if state is not None:
                return state
        return None

    def _read_state(self, future) -> TrainingState | None:
        """The training state in a finished round output, or ``None`` if none can be read."""
        # A round result may keep its state on the worker that made it
        # (daskdist.strategies.sync.StepResult), while the copies on the
        # workers that fetched it have none: ask every holder.
        holders = sorted(self.client.who_has(future).get(future.key, ()))
        readers = [self.client.submit(_state_of, future, pure=False, workers=[holder],
                                      key=f"daskdist-state-of-{future.key}-{i}")
                   for i, holder in enumerate(holders)]
        try:
            for reader in readers:
                try:
                    state = reader.result(timeout=_READ_BACK_TIMEOUT)
                except (TimeoutError, FutureCancelledError):  # its worker went away meanwhile
                    state = None
                if state is not None:
                    return state
            return None
        finally:
            _release(readers)

    def cancel(self) -> None:
        """Stop every round in flight, and drop rounds queued but not yet sent.

        The rounds' futures are released rather than cancelled: the scheduler
        forgets every task that no one waits for any more, running ones
        included. (``Client.cancel`` also cancels dependents, and the
        scheduler refuses that for dependents whose futures no client holds,
        as is the case for most of a run's tasks.)
        """
        self._queued, self._placement = [], {}
        _release(self._inflight)
        self._inflight.clear()

    def close(self) -> None:
        """Release the shards and cached replicas of this run on the cluster."""
        self.cancel()
        # Dropping the last references releases the keys on the scheduler.
        self.shards = []
        self.spec_future = self._state = self._latest = None
        self._settled.clear()
        try:
            self.client.run(drop_run, self.run_id)
        except Exception:  # a closing cluster must not mask the fit's own outcome
            logger.debug("could not drop cached replicas of run %s", self.run_id, exc_info=True)


def _identity(x):
    return x


def _release(outputs) -> None:
    """Release the unfinished futures in (nested lists of) round outputs."""
    if isinstance(outputs, Future):
        if outputs.status == "pending":
            outputs.release()
    elif isinstance(outputs, (list, tuple, deque)):
        for output in outputs:
            _release(output)


def _resolve(output, futures: dict):
    """Replace queued placeholders in a round output by the futures sent for them."""
    if isinstance(output, Delayed):
        return futures[output.key]
    if isinstance(output, (list, tuple)):
        return type(output)(_resolve(o, futures) for o in output)
    return output


def _state_of(value):
    """The training state in a round's output (a strategy's round result or a state)."""
    return getattr(value, "state", value)


#: Seconds to wait for a worker to hand back a finished round's state on Ctrl-C.
_READ_BACK_TIMEOUT = 10

#: Future states that mean the data is gone rather than still coming.
_LOST = ("cancelled", "lost")
#: Scheduler task states of a key on its way (again).
_COMING = ("waiting", "queued", "processing", "no-worker", "memory")
#: Seconds between checks on a round output that takes long.
_POLL_S = 2

#: Keys of the tasks that belong to one shard (its build, its rounds); group 1: the shard.
_SHARD_TASK = re.compile(r"\('daskdist-(?:shard|round)-[^']*', (?:\d+, )?(\d+)\)$")
