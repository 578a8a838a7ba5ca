"""The driver: shards → rounds → aggregation → epochs, through Dask futures.

:class:`Trainer` is the engine behind the estimators and is usable on its own::

    trainer = Trainer(client, spec, LocalSGD(sync_every=8), batch_size=256)
    trainer.start(X, y, initial_state)
    for epoch in range(10):
        result = trainer.run_epoch(lr=0.05)
    state = trainer.state()
    trainer.close()

The driver only moves futures. At the start it asks the data source to place
the shards (:meth:`daskdist.data.sources.Source.place`) and submits them;
then each epoch it hands an :class:`~daskdist.driver.context.EpochContext` to
the strategy (``strategy.train_epoch(ctx)``), which submits the epoch's
rounds, settles the round outputs the strategy tracks
(:mod:`daskdist.driver.tracker`), and recovers when a worker is lost
(:mod:`daskdist.driver.recovery`). Epoch boundaries are synchronisation
points: the state comes back to the client there, and the learning rate for
the next epoch's rounds is read then.
"""

from __future__ import annotations

import functools
import logging
import time
import uuid
import warnings
from dataclasses import replace

import dask
from distributed.client import FutureCancelledError

from .._compat import workers as cluster_workers
from ..data.sources import ShardOptions, as_source
from ..errors import ShardFailedError, StateLost, WorkerLost
from ..spec import ModelSpec
from ..state import TrainingState
from ..worker.devices import is_cuda, worker_info
from ..worker.runtime import drop_run
from . import agreement, balance, membership, own_parts, recovery, reshard, round_hooks
from .context import EpochContext, EpochInfo
from .holdout import score_holdout
from .placement import plan_devices
from .queue import TaskQueue
from .results import RECOVERY_COLUMNS, ROUND_COLUMNS, EpochResult, round_rows
from .tracker import RoundTracker, raise_failure
from .waiting import Waiter

__all__ = ["Trainer", "EpochResult", "ShardFailedError", "ROUND_COLUMNS", "RECOVERY_COLUMNS"]

logger = logging.getLogger(__name__)

def _identity(x):
    return x


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
        Replicas; default one per worker (as the strategy says).
    random_state : int
        Seed of shard plans, shuffles and per-round torch seeds.
    shuffle : bool
        Reshuffle each shard every epoch.
    data : daskdist.data.sources.ShardOptions, optional
        How the data becomes shards: the plan, the hold-out, how rows are
        converted, streaming (default: random shards, no hold-out).
    lookahead : int, optional
        Rounds submitted ahead of the last finished one (config
        ``daskdist.driver.lookahead``).
    elastic : bool
        Follow the cluster's workers between epochs (:mod:`.membership`);
        False keeps the replicas where the fit placed them.
    resize : bool
        With ``elastic``: let the replica count follow the workers (else only
        the placement does, as when ``n_replicas`` was given).
    max_replicas : int, optional
        The most replicas a resized fit grows to.
    sharding, holdout, stratify, shard_kwargs, direct_scatter, streaming, buffer_chunks
        Deprecated: the fields of ``data`` (``shard_kwargs`` is
        ``data.convert``); passed here they are forwarded with a
        ``DeprecationWarning``.
    """

    def __init__(self, client, spec: ModelSpec, strategy, *, batch_size: int,
                 n_replicas: int | None = None, sharding: str | None = None,
                 random_state: int = 0, shuffle: bool = False, holdout: float | None = None,
                 stratify: bool | None = None, shard_kwargs: dict | None = None,
                 lookahead: int | None = None, direct_scatter: bool | None = None,
                 streaming=None, buffer_chunks: int | None = None,
                 data: ShardOptions | None = None, elastic: bool = True, resize: bool = True,
                 max_replicas: int | None = None):
        self.client = client
        self.spec = spec
        self.strategy = strategy
        self.batch_size = int(batch_size)
        self.n_replicas = n_replicas
        self.random_state = int(random_state)
        self.shuffle = bool(shuffle)
        self.data = ShardOptions.from_keywords(
            data, sharding=sharding, holdout=holdout, stratify=stratify,
            shard_kwargs=shard_kwargs, direct_scatter=direct_scatter, streaming=streaming,
            buffer_chunks=buffer_chunks)
        self.lookahead = int(lookahead if lookahead is not None
                             else dask.config.get("daskdist.driver.lookahead"))
        self.elastic, self.resize, self.max_replicas = bool(elastic), bool(resize), max_replicas
        self.run_id = uuid.uuid4().hex[:10]
        self.epoch = 0
        self.round = 0
        #: Recovery generation: part of every task key, so that tasks of an attempt given
        #: up never collide with their replacements.
        self.generation = 0
        self.rounds_: list[dict] = []
        self.queue = TaskQueue(client)
        self.waiter = Waiter(client, self.run_id)
        self.tracker = RoundTracker(self.waiter, self.lookahead, recovery.shard_failed)
        self._state = None  # the future of the current state
        self._epoch_round = 0  # the round the current epoch started at
        self._epoch_state = None
        #: ``(every, fn)`` pairs: ``fn(state)`` gets the state of every
        #: ``every``-th round as the driver sees it finish (round checkpoints).
        self.round_hooks: list = []
        #: What the strategy keeps from one epoch to the next of this fit.
        self.scratch: dict = {}
        self.shards = []
        #: Each shard as a selection of the fit's first shards, once replicas changed.
        self.recipes = None
        #: One record per change of the replicas (:func:`.membership.follow_workers`).
        self.changes: list[dict] = []
        #: ``(epoch, steps)`` of an epoch whose replicas changed mid-way.
        self.epoch_steps: tuple | None = None
        #: Balanced replicas' local steps per round (:mod:`.balance`; None: the strategy's).
        self.replica_steps: list | None = None
        #: The input's chunks of each streamed shard, once replicas changed.
        self.stream_chunks: list | None = None
        #: One record per recovery from a lost worker (see :meth:`run_epoch`).
        self.recoveries: list[dict] = []

    # -- set-up -------------------------------------------------------------------------------
    def start(self, X, y, state: TrainingState, sample_weight=None) -> Trainer:
        """Place the shards, and send the model and initial state.

        Parameters
        ----------
        X, y : numpy.ndarray or dask.array.Array
            Training data; numpy shards are sent to their workers, dask shards
            are assembled on them from the chunks.
        state : TrainingState
            Where training starts.
        sample_weight : numpy.ndarray, optional
            One weight per sample of in-memory ``X``; each shard carries its rows'.
        """
        data = self.data
        direct = (data.direct_scatter if data.direct_scatter is not None
                  else dask.config.get("daskdist.shards.direct-scatter"))
        self.source = as_source(X, y, direct=direct, streaming=data.streaming,
                                buffer_chunks=data.buffer_chunks, sample_weight=sample_weight)
        self.wait_for_a_worker()
        self._plan_devices()
        workers = self.live_workers()
        n = self.n_replicas or self.strategy.replicas_for(len(workers))
        self.strategy.check_model(self.spec)
        placed = self.strategy.place_replicas(workers, n)
        self.replica_batch = [self.batch_size // n + (1 if i < self.batch_size % n else 0)
                              for i in range(n)]
        if min(self.replica_batch) < 1:
            raise ValueError(
                f"batch_size={self.batch_size} is smaller than the number of replicas ({n}); "
                "every replica needs at least one sample per step."
            )
        self.strategy.check_replicas(placed)
        self.shard_set = self.source.place(self.client, n, placed, options=data,
                                           random_state=self.random_state, run_id=self.run_id)
        self.replica_workers = list(self.shard_set.workers)
        self.spec_future = self.submit_spec()
        self.shards = self.shard_set.submit_all(self.client, self.replica_workers,
                                                run_id=self.key_prefix)
        self.shard_losses = recovery.ShardLosses(n)
        sizes = reshard.gather_shard_sizes(self)
        self.shard_sizes = [s[0] for s in sizes]
        self.valid_sizes = [s[1] for s in sizes]
        if min(self.shard_sizes) < 1:
            raise ValueError("A shard has no training samples left after the hold-out split.")
        self.steps_per_epoch = reshard.steps_per_epoch(self.shard_sizes, self.replica_batch)
        # Counters continue from the state, so that shuffles and per-round
        # seeds of a continued (or resumed) fit are those of an uninterrupted one.
        # A state saved mid-epoch logs the rounds its epoch has done so far.
        self.epoch, self.round = state.epoch, state.round
        self._epoch_round = state.round - sum(1 for r in state.log if r["epoch"] == state.epoch)
        self.set_state(state)
        self._epoch_state = state
        logger.info("daskdist run %s: %d replicas on %d workers, shards of %s samples%s",
                    self.run_id, n, len(set(self.replica_workers)), self.shard_sizes,
                    f", streamed with a buffer of {data.buffer_chunks} chunks"
                    if self.shard_set.streaming else "")
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

    @property
    def key_prefix(self) -> str:
        """Run id and recovery generation, shared by this run's task keys."""
        return f"{self.run_id}-{self.generation}"

    def task_key(self, kind: str, *index: int, epoch: int | None = None) -> tuple:
        """The key of a task of this run.

        That is ``("daskdist-<kind>-<run>-<generation>[-e<epoch>]", *index)``.
        Tuple keys put each run's (and each epoch's) tasks of one kind in a
        task group of their own, which the dashboard's spans are made of; the
        task prefix, ``daskdist-<kind>``, names the kind of work.
        """
        name = f"daskdist-{kind}-{self.key_prefix}" + ("" if epoch is None else f"-e{epoch}")
        return (name, *(int(i) for i in index))

    def submit_spec(self):
        """Send the model specification (once per fit, and again if it was lost)."""
        return self.client.submit(_identity, self.spec, pure=False,
                                  key=f"daskdist-spec-{self.key_prefix}")

    def valid_rows(self):
        """Source rows held out for validation (client-side hold-outs only)."""
        return self.shard_set.valid_rows()

    def set_state(self, state: TrainingState) -> None:
        """Continue from ``state`` (sent from the client)."""
        # The state travels inside the task, not scattered: the scheduler can then
        # compute it again if the worker holding it dies. Dask warns about large
        # graphs (a model of millions of parameters), which here is deliberate.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Sending large graph")
            self._state = self.client.submit(
                _identity, state,
                # a fresh key for every state sent: one sent again at the same round (changed
                # by a callback) must not be taken for the one already there
                key=f"daskdist-state-{self.key_prefix}-{self.round}-e{state.epoch}-"
                    f"{uuid.uuid4().hex[:6]}",
                pure=False)
        self.tracker.reset(state.round, self._state)

    def change_state(self, state: TrainingState) -> None:
        """Between epochs: continue from ``state``, which the next epoch also recovers to."""
        self.set_state(state)
        self._epoch_state = state

    # -- tasks and waiting ----------------------------------------------------------------------
    def submit(self, func, *args, key, worker: str, **kwargs):
        """Queue the task ``func(*args, **kwargs)`` for the next :meth:`flush`.

        The task is placed on ``worker`` and may run elsewhere if that worker
        is gone. Returns a placeholder (a :class:`dask.delayed.Delayed`) that
        later tasks of the same flush take as an argument.
        """
        return self.queue.submit(func, *args, key=key, worker=worker, **kwargs)

    def flush(self, strict: bool = False) -> dict:
        """Send the queued tasks to the scheduler as one graph; return their futures by key.

        With ``strict``, each task runs on its worker only (for tasks that
        need what an earlier task left in that worker's memory); otherwise it
        may run elsewhere when its worker is gone or busy.
        """
        return self.queue.flush(strict=strict)

    def wait(self, futures, return_when: str = "ALL_COMPLETED",
             timeout: float | None = None) -> set:
        """Wait for all (or the first) of ``futures``; return those done.

        See :meth:`daskdist.driver.waiting.Waiter.wait`.
        """
        return self.waiter.wait(futures, return_when, timeout)

    def check(self, future) -> None:
        """Raise what to do about a done future that did not finish (see ``EpochContext``)."""
        if future.status == "finished":
            return
        try:
            error = future.exception()  # (done: returns at once)
        except FutureCancelledError:
            error = None
        if future.status != "error":
            raise WorkerLost(f"round {future.key} was lost with a worker")
        raise_failure(future, error, recovery.shard_failed)

    def live_workers(self) -> list[str]:
        """The addresses of the cluster's workers now, sorted."""
        return sorted(cluster_workers(self.client))

    def wait_for_a_worker(self) -> None:
        """Wait until the cluster has a worker (``daskdist.driver.worker-timeout`` at most)."""
        timeout = dask.config.get("daskdist.driver.worker-timeout")
        try:
            self.client.wait_for_workers(1, timeout=timeout)
        except TimeoutError:
            raise RuntimeError(
                f"The Dask cluster has had no workers for {timeout}; cannot train on it."
            ) from None

    # -- epochs ---------------------------------------------------------------------------------
    def run_epoch(self, lr, schedule=None) -> EpochResult:
        """Train one epoch and return its result (state and statistics).

        If a worker is lost and takes with it data that Dask cannot recompute
        (shards sent from the client, the newest round's state), the driver
        recovers (:mod:`daskdist.driver.recovery`): it stops the rounds in
        flight, re-sends the lost shards to live workers, and continues the
        epoch from the newest round whose state a live worker still holds —
        so at most the round in progress is lost, and every round's update is
        applied once. Each recovery is recorded in :attr:`recoveries`; at
        most ``daskdist.driver.recoveries`` happen per epoch. Workers that
        join or leave are followed before the epoch, and between two of its
        rounds where the strategy allows (:mod:`.membership`).

        Parameters
        ----------
        lr : float or tuple of float
            Learning rate of every round in the epoch (one per parameter group).
        schedule : daskdist.plan.StepTable, optional
            A per-step schedule's hyperparameters for each step of the epoch,
            in place of ``lr`` (:mod:`daskdist.schedules`).
        """
        limit = dask.config.get("daskdist.driver.recoveries")
        self._follow_workers()
        balance.rebalance(self)
        # where a recovery goes back to when no newer state is held: the epoch's start, or
        # the round where the replicas last changed
        base_round, base_state = self._epoch_round, self._epoch_state
        t0, attempt = time.perf_counter(), 0
        while True:
            try:
                result = self._run_epoch_once(lr, t0, schedule)
            except WorkerLost as lost:
                if attempt == limit:
                    raise RuntimeError(
                        f"Epoch {self.epoch} lost workers {limit + 1} times ({lost}); giving up "
                        "(daskdist.driver.recoveries)."
                    ) from None
                attempt += 1
                self.recoveries.append(recovery.recover(self, lost, base_round, base_state))
                continue
            if result is not None:
                return result
            # the round loop stopped for workers that joined or left: follow them, go on
            base_round, base_state = self.round, self._state.result()
            self._follow_workers(step=self.epoch_step())

    def _follow_workers(self, step: int | None = None) -> None:
        change = membership.follow_workers(self, step)
        if change is not None:
            self.changes.append(change)

    def epoch_step(self) -> int:
        """The step of the current epoch that the state's round reached."""
        sizes = self.strategy.round_sizes(membership.epoch_steps(self))
        return sum(sizes[:self.round - self._epoch_round])

    def context(self, lr, schedule=None) -> EpochContext:
        """The strategy's view of this epoch attempt."""
        info = EpochInfo(
            run_id=self.run_id, attempt=self.key_prefix, epoch=self.epoch,
            first_round=self._epoch_round, round=self.round, lr=lr, schedule=schedule,
            model=self.spec,
            start=self._epoch_state, replica_workers=tuple(self.replica_workers),
            shard_sizes=tuple(self.shard_sizes), replica_batch=tuple(self.replica_batch),
            steps_per_epoch=membership.epoch_steps(self), lookahead=self.lookahead,
            replica_steps=None if self.replica_steps is None else tuple(self.replica_steps),
            random_state=self.random_state, shuffle=self.shuffle,
            max_non_finite=dask.config.get("daskdist.driver.max-non-finite"))
        return EpochContext(info, spec=self.spec_future, shards=list(self.shards),
                            state=self._state, client=self.client, scratch=self.scratch,
                            _driver=self)

    def _run_epoch_once(self, lr, t0: float, schedule) -> EpochResult | None:
        self.tracker.on_settle = (functools.partial(round_hooks.call, self) if self.round_hooks
                                 else None)
        # between two rounds, the workers are looked at where the replicas may change then
        self.tracker.watch = (functools.partial(membership.watch, self)
                              if membership.resizes_mid_epoch(self) else None)
        ctx = self.context(lr, schedule)
        try:
            try:
                self.strategy.train_epoch(ctx)
                if ctx._final is None:
                    raise RuntimeError(f"strategy {self.strategy.name!r} ended epoch "
                                       f"{self.epoch} without ctx.finish(final_state, round).")
                self._state, self.round = ctx._final
                self.tracker.settle_all()
            except membership.MembersChanged:  # stop after the running round, go on later
                self._state, self.round = membership.pause(self, ctx)
                self.tracker.settle_all()
                self.tracker.reset(self.round, self._state)
                return None
            finally:
                self.tracker.watch = None
            try:  # an untracked round of the last ones may have lost its replica's state
                final = self._state.result()
            except StateLost as lost:
                raise WorkerLost(str(lost)) from None
            final = own_parts.at_epoch_end(self, final)
        except BaseException:  # interrupted, or a worker lost: stop the newest rounds too
            self.queue.release_pending()
            raise
        result = replace(final, epoch=self.epoch + 1)
        duration = time.perf_counter() - t0
        log = list(result.log)
        samples = sum(r["samples"] for r in log)
        epoch = EpochResult(
            epoch=self.epoch, state=result,
            train_loss=sum(r["loss_sum"] for r in log) / max(samples, 1),
            samples=samples, rounds=self.round_rows(result), duration=duration,
            drift=agreement.check_agreement(self, final), replicas=len(self.shards),
            changes=[c for c in self.changes if c["epoch"] == self.epoch],
        )
        skipped = [(r["round"], r["skipped"]) for r in epoch.rounds if r["skipped"]]
        if skipped:
            logger.warning("daskdist run %s, epoch %d: non-finite updates left out of the "
                           "average (round, replicas): %s", self.run_id, self.epoch, skipped)
        if self.data.holdout:
            epoch.valid = self.evaluate()
        self.rounds_.extend(epoch.rounds)
        self.epoch += 1
        self._epoch_state, self._epoch_round = result, self.round
        return epoch

    @staticmethod
    def round_rows(state: TrainingState) -> list[dict]:
        """Rows of the ``rounds_`` table for the rounds logged in ``state``."""
        return round_rows(state)

    def evaluate(self) -> dict:
        """Loss (and accuracy) of the current state on every shard's hold-out."""
        return score_holdout(self)

    # -- results and tear-down ---------------------------------------------------------------
    def state(self) -> TrainingState:
        """The latest training state (waits for rounds in flight)."""
        return self._state.result()

    def stop(self) -> TrainingState | None:
        """Cancel the rounds in flight; return the state of the last finished round.

        Returns ``None`` when no round of this run finished (or none can be
        read back any more).
        """
        return recovery.newest_state(self)

    def cancel(self) -> None:
        """Stop every round in flight, and drop rounds queued but not yet sent.

        The rounds' futures are released rather than cancelled: the scheduler
        forgets every task that no one waits for any more, running ones
        included. (``Client.cancel`` also cancels dependents, and the
        scheduler refuses that for dependents whose futures no client holds,
        as is the case for most of a run's tasks.)
        """
        self.queue.release_pending()
        for _, future in self.tracker.inflight:
            if future.status == "pending":
                future.release()
        self.tracker.inflight.clear()

    def close(self) -> None:
        """Release the shards, cached replicas and kept states of this run on the cluster."""
        self.cancel()
        # Dropping the last references releases the keys on the scheduler.
        self.shards = []
        self.spec_future = self._state = None
        self.tracker.clear()
        try:
            self.client.run(drop_run, self.run_id)
        except Exception:  # a closing cluster must not mask the fit's own outcome
            logger.debug("could not drop cached replicas of run %s", self.run_id, exc_info=True)
