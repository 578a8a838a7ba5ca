"""What a strategy sees of the driver while it runs an epoch.

The driver hands each epoch (each attempt at it, after a recovery too) to
``strategy.train_epoch(ctx)`` with an :class:`EpochContext`, and a strategy
touches nothing else of the driver: the facts of the epoch are in
:attr:`EpochContext.info`; the futures it starts from are ``spec``,
``shards`` and ``state``; it builds plans and task keys, submits and waits
through the context, tracks the round outputs the driver should watch,
finishes the epoch with its final state, and reports a lost worker with
:meth:`EpochContext.lost`. ``scratch`` keeps what a strategy needs from one
epoch to the next of the same fit.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import WorkerLost
from ..plan import RoundPlan
from ..spec import ModelSpec
from ..state import TrainingState
from .queue import resolve

__all__ = ["EpochContext", "EpochInfo"]


@dataclass(frozen=True)
class EpochInfo:
    """The facts of one epoch attempt.

    Attributes
    ----------
    run_id : str
        The fit (worker caches are keyed by it).
    attempt : str
        The run id and recovery generation: tasks of an attempt given up
        must not touch what a later attempt loads.
    epoch : int
        Epoch index (0-based, over the whole fit).
    first_round : int
        The round this epoch started at.
    round : int
        The round ``state`` holds (``round - first_round`` of the epoch's
        rounds are done already, after a recovery).
    lr : float or tuple of float
        The learning rate of every round of the epoch (one per parameter
        group).
    schedule : StepTable or None
        A per-step schedule's hyperparameters for each step of the epoch
        (every plan carries it; :meth:`RoundPlan.hyper`), or None.
    model : ModelSpec
        What each replica trains (its future is :attr:`EpochContext.spec`).
    start : TrainingState
        The state the epoch started from, in the client's memory.
    replica_workers : tuple of str
        The worker of each replica (and of its shard).
    shard_sizes : tuple of int
        Training samples of each replica's shard.
    replica_batch : tuple of int
        Each replica's share of the global batch.
    steps_per_epoch : int
        Optimizer steps in an epoch (of the replica with the most).
    replica_steps : tuple of int or None
        Balanced replicas' local steps per round, where they differ
        (:mod:`daskdist.driver.balance`); None: every replica takes the
        round's steps.
    lookahead : int
        Rounds a strategy may submit ahead of the last finished one.
    random_state : int
        Seed of shuffles and per-round seeds.
    shuffle : bool
        Reshuffle each shard every epoch.
    max_non_finite : int or None
        Non-finite updates a fit tolerates.
    """

    run_id: str
    attempt: str
    epoch: int
    first_round: int
    round: int
    lr: float | tuple
    schedule: object
    model: ModelSpec
    start: TrainingState
    replica_workers: tuple
    shard_sizes: tuple
    replica_batch: tuple
    steps_per_epoch: int
    lookahead: int
    random_state: int
    shuffle: bool
    max_non_finite: int | None
    replica_steps: tuple | None = None

    @property
    def done(self) -> int:
        """Rounds of this epoch that ``state`` already holds."""
        return self.round - self.first_round


@dataclass
class EpochContext:
    """The strategy's view of the driver for one epoch attempt.

    Its members are the whole interface; see ``docs/architecture.md``.
    """

    info: EpochInfo
    spec: object  # the future of info.model
    shards: list
    state: object  # the future of the state the epoch continues from
    client: object
    scratch: dict
    _driver: object = field(repr=False, default=None)
    #: set by :meth:`finish`: ``(future of the final state, round it holds)``
    _final: tuple | None = field(repr=False, default=None)

    def plan(self, replica: int, *, round: int, first_step: int, n_steps: int,
             **fields) -> RoundPlan:
        """The :class:`~daskdist.plan.RoundPlan` of one replica's round.

        The fit's facts (run, epoch, batch share, learning rate, seeds,
        limits) are filled in; ``fields`` override any of them
        (``compression``, ``density``, ``epoch``, ``lr`` …).
        """
        info = self.info
        values = dict(run_id=info.run_id, replica=replica, epoch=info.epoch, round=round,
                      first_step=first_step, n_steps=n_steps,
                      batch_size=info.replica_batch[replica], lr=info.lr, schedule=info.schedule,
                      random_state=info.random_state, shuffle=info.shuffle,
                      max_non_finite=info.max_non_finite, epoch_steps=info.steps_per_epoch)
        values.update(fields)
        return RoundPlan(**values)

    def key(self, kind: str, *index: int, epoch: bool = True) -> tuple:
        """The key of a task: ``("daskdist-<kind>-<attempt>[-e<epoch>]", *index)``.

        The task prefix, ``daskdist-<kind>``, names the kind of work on the
        dashboard; ``epoch=False`` leaves the epoch out (tasks shared by
        every epoch).
        """
        return self._driver.task_key(kind, *index, epoch=self.info.epoch if epoch else None)

    def submit(self, func, *args, key, worker: str | None, queue: bool = True,
               strict: bool = False, priority: int = 0, **kwargs):
        """Submit ``func(*args, **kwargs)`` as task ``key``, placed on ``worker``.

        With ``queue`` (the default) the task waits for :meth:`flush`, which
        sends every queued task as one graph, and a placeholder is returned
        that later tasks may take as an argument; otherwise it is sent now
        and its future returned. ``strict`` keeps the task on ``worker``
        even when that worker is gone (for tasks that need what an earlier
        task left in its memory); otherwise it runs elsewhere then. Of the
        tasks ready on a worker, those of higher ``priority`` run first.
        """
        if queue:
            return self._driver.queue.submit(func, *args, key=key, worker=worker,
                                             priority=priority, **kwargs)
        return self._driver.queue.submit_now(func, *args, key=key, worker=worker,
                                             strict=strict, priority=priority, **kwargs)

    def flush(self, outputs=None, strict: bool = False):
        """Send the queued tasks; return ``outputs`` with placeholders replaced by futures."""
        return resolve(outputs, self._driver.queue.flush(strict=strict))

    def wait(self, futures, return_when: str = "ALL_COMPLETED",
             timeout: float | None = None) -> set:
        """Wait for all (or the first) of ``futures``; return those done.

        Futures lost with a worker count as done. After ``timeout`` seconds
        returns those done so far. A safe point for Ctrl-C.
        """
        return self._driver.waiter.wait(futures, return_when, timeout)

    def check(self, future) -> None:
        """Raise what the driver should do about a done future that did not finish.

        :class:`~daskdist.errors.WorkerLost` when its data went with a
        worker (or a replica found its state gone), a
        :class:`~daskdist.errors.ShardFailedError` when Dask gave up on a
        shard's task, the task's own error otherwise; nothing when it
        finished.
        """
        self._driver.check(future)

    def track(self, state_round: int, output, resume: tuple | None = None) -> None:
        """Have the driver watch a round output that holds state round ``state_round``.

        The driver settles tracked outputs in order, ``info.lookahead``
        behind, raises when one failed or was lost, recovers from the newest
        it still holds, and hands settled states to round checkpoints.

        ``resume``: ``(round, round output, plans)``, what
        ``strategy.finish_epoch`` turns into a whole state after this round.
        Given it, the driver may stop the epoch's loop after this round when
        workers joined or left (:mod:`daskdist.driver.membership`): it lets
        the round running then finish, drops the later ones (none started),
        and runs the rest of the epoch on the re-planned replicas.
        """
        self._driver.tracker.track(state_round, output, resume)

    def finish(self, final, round: int) -> None:
        """End the epoch: ``final`` is the future of its last state, at round ``round``.

        """
        self._final = (final, round)

    def lost(self, reason: str, rounds_lost: int | None = None):
        """Report that a worker the epoch needs is gone: raises :class:`WorkerLost`.

        ``rounds_lost``: finished rounds that will run again, when the
        strategy knows (None: the driver counts them).
        """
        raise WorkerLost(reason, rounds_lost)

    def live_workers(self) -> list[str]:
        """The addresses of the cluster's workers now, sorted."""
        return self._driver.live_workers()
