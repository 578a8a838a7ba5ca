"""Parameter-server training: each replica's update is applied as soon as it arrives.

The base of ``async`` and ``ssp``. There is no round in which all replicas
meet. Each replica runs ``sync_every`` local steps from the newest global
state it can get, and sends the change it made (its *delta*). The driver, on
the client, watches the replicas' round futures and, as each one finishes,
submits a task that adds the delta to the newest global state, giving the
next *version*; the replica then starts its next round from that version.
The global state is a chain of Dask futures like every other strategy's
state, so it is recomputed from lineage or recovered like theirs when a worker
dies (an Actor's state would die with its worker).

A replica moves through its own shard at its own pace: the state keeps, per
replica, its pass over the shard, its next step and the rounds it has had
applied (:attr:`~daskdist.state.TrainingState.cursors`). An epoch ends once
the updates applied in it cover as many samples as the training set; a fast
replica then has trained on more of its shard (going on into its next pass)
than a slow one. At the end of an epoch the driver lets the rounds in flight
finish and applies them, so each epoch's state holds every update started in
it.

*Staleness* of an update: the global version it is applied to, minus the
version its replica started from (how many other updates arrived meanwhile).
"""

from __future__ import annotations

import time
from dataclasses import replace

import dask
import numpy as np
from distributed import KilledWorker
from distributed.client import FutureCancelledError

from ..dashboard.events import emit_from_worker, round_event
from ..errors import WorkerLost
from ..state import TrainingState, tree_add, tree_diff, tree_nbytes
from ..worker.aggregation import combine, count_skipped
from ..worker.replica import RoundPlan, _pack, _worker_address, local_steps
from .base import Strategy

__all__ = ["ParameterServer", "local_delta", "apply_update", "next_version", "close_epoch"]


def local_delta(spec, shard, state: TrainingState, plan: RoundPlan):
    """Run ``plan.n_steps`` local steps; return the change made to the state.

    The ``daskdist-round`` task of parameter-server strategies: a
    :class:`~daskdist.worker.replica.Contribution` whose payload is the new
    parameters, buffers and optimizer state minus the starting ones. With
    ``plan.compression`` the parameters' delta is packed, with the replica's
    error-feedback memory on this worker (buffers and optimizer state travel
    as they are).
    """
    contribution = local_steps(spec, shard, state, plan)
    if contribution.weight and not contribution.non_finite:
        before = {"params": state.params, "buffers": state.buffers,
                  "optimizer": state.optimizer}
        delta = tree_diff(contribution.payload, before)
        if plan.compression:
            delta["params"] = _pack(delta["params"], plan)
        contribution.payload = delta
    return contribution


def apply_update(state: TrainingState, *contributions, scales, record: dict, cursors: tuple,
                 transfers: int, plan: RoundPlan) -> TrainingState:
    """Add replicas' deltas, each times its scale, to the global state: the next version.

    The ``daskdist-apply`` task: one delta for ``async`` and ``ssp``, the
    deltas that made a round's deadline (and late ones from earlier rounds)
    for a ``local_sgd`` with a deadline. ``scales`` is one factor per delta,
    or None for the sample-weighted mean of the finite ones. ``record`` holds
    what the driver knows of the update (epoch, staleness, rows); the round
    log gets it with the deltas' loss, samples, timings and bytes.
    ``transfers`` is the number of times the update made a copy of the global
    state cross between workers. Non-finite deltas are left out, and counted
    against ``plan.max_non_finite`` (``plan`` names the version and epoch).
    """
    total = combine(*contributions, payload=False)
    skipped = count_skipped(state, total, plan)
    if scales is None:
        scales = [c.weight / total.weight if total.weight else 0.0 for c in contributions]
    tree = {"params": state.params, "buffers": state.buffers, "optimizer": state.optimizer}
    for c, scale in zip(contributions, scales):
        if c.weight and not c.non_finite:
            tree = tree_add(tree, c.payload, scale)
    return next_version(state, contributions, total, tree, skipped, record=record,
                        cursors=cursors, transfers=transfers)


def next_version(state: TrainingState, contributions, total, tree: dict, skipped, *,
                 record: dict, cursors: tuple, transfers: int) -> TrainingState:
    """The global state after an update: ``tree`` and the update's record in the round log."""
    t_end = time.time()
    here = _worker_address()
    record = {
        **record,
        "round": state.round,
        "replicas": tuple(c.replica for c in contributions if c.weight),
        "skipped": tuple(c.replica for c in contributions if c.non_finite),
        "samples": int(total.weight),
        "steps": total.steps,
        "loss_sum": total.loss_sum,
        "bytes": int(transfers * state.nbytes
                     + sum(tree_nbytes(c.payload) for c in contributions if c.worker != here)),
        "compute_s": total.compute_s,
        # from the last contribution's arrival to its application
        "sync_s": max(t_end - max(c.t_start + c.compute_s for c in contributions), 0.0),
        "t_start": total.t_start,
        "t_end": t_end,
        "per_replica": tuple((c.replica, c.loss_sum, c.weight, c.compute_s)
                             for c in contributions),
    }
    emit_from_worker(round_event(record["run"], record))
    log = state.log if state.log and state.log[-1]["epoch"] == record["epoch"] else ()
    return TrainingState(
        params=tree["params"], buffers=tree["buffers"], optimizer=tree["optimizer"],
        step=state.step + total.steps, round=state.round + 1, epoch=state.epoch,
        skipped=skipped, log=log + (record,), cursors=cursors,
    )


def close_epoch(state: TrainingState, epoch: int) -> TrainingState:
    """The ``daskdist-close`` task: the state counts epoch ``epoch`` as completed."""
    return replace(state, epoch=epoch + 1)


def _progress(state: TrainingState, epoch: int) -> tuple:
    """What the driver needs of a state to go on: version, cursors, rows done this epoch."""
    rows = sum(r["rows"] for r in state.log if r["epoch"] == epoch)
    return state.round, state.cursors, rows


class ParameterServer(Strategy):
    """Base of the strategies that apply each replica's update as it arrives.

    Each update is scaled by its samples over the samples of the same round
    (the same steps of their passes) on every replica: when all replicas
    start from the same version and run at the same pace, one round of
    updates adds up to the sample-weighted average of the replicas' changes,
    as ``local_sgd`` would make. ``staleness`` bounds how many rounds a replica
    may run ahead of the slowest one (``None``: no bound).

    Parameters
    ----------
    sync_every : int
        Local optimizer steps in each replica's round.
    staleness : int or None
        The bound (see :class:`~daskdist.strategies.SSP`).
    """

    name = ""
    #: Updates carry a staleness, which the history summarises per epoch.
    asynchronous = True

    def __init__(self, sync_every: int = 8, staleness: int | None = None):
        self.sync_every = sync_every
        self.staleness = staleness
        self.validate()

    def validate(self) -> None:
        for option in ("sync_every", "staleness"):
            value = getattr(self, option)
            if option == "staleness" and value is None:
                continue
            minimum = 1 if option == "sync_every" else 0
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) \
                    or value < minimum:
                raise ValueError(f"{option} must be an integer >= {minimum}, got {value!r}.")

    def round_sizes(self, steps_per_epoch: int) -> list[int]:
        k = self.sync_every
        return [min(k, steps_per_epoch - s) for s in range(0, steps_per_epoch, k)]

    def rounds_per_epoch(self, steps_per_epoch: int, n_replicas: int) -> int:
        # one row per update: each replica's rounds, when they go at the same pace
        return n_replicas * len(self.round_sizes(steps_per_epoch))

    def drive_epoch(self, trainer, lr, epoch_round: int) -> None:
        """Run one epoch of updates; leave ``trainer._state`` as its final state's future."""
        _Epoch(self, trainer, lr).run()


class _Epoch:
    """The driver's loop over one epoch of a parameter-server strategy."""

    #: ``task(spec, shard, state, plan) -> Contribution``: a replica's round.
    round_task = staticmethod(local_delta)

    def __init__(self, strategy: ParameterServer, trainer, lr):
        self.strategy, self.trainer, self.lr = strategy, trainer, lr
        self.round_steps = getattr(strategy, "sync_every", 1)
        self.client = trainer.client
        n = len(trainer.shards)
        self.steps = [int(np.ceil(size / b))
                      for size, b in zip(trainer.shard_sizes, trainer.replica_batch)]
        version, cursors, rows_done = self.client.submit(
            _progress, trainer._state, trainer.epoch, pure=False,
            key=trainer.task_key("progress", trainer.round)).result()
        if len(cursors) != n:  # a new fit, or one on other replicas: start every pass afresh
            cursors = ((0, 0, 0),) * n
        self.version = version
        self.cursors = [tuple(c) for c in cursors]
        self.rows_left = sum(trainer.shard_sizes) - rows_done
        self.global_state = trainer._state
        self.global_worker = None  # where the newest version is (None: sent from the client)
        # round future -> (replica, plan, version started from, rows, whether the replica
        # fetched that version from another worker)
        self.inflight: dict = {}
        self.started = [c[2] for c in self.cursors]  # rounds started, per replica

    # -- rounds ---------------------------------------------------------------------------------
    def _rows(self, i: int, step: int) -> int:
        """Rows of replica ``i``'s round that starts at ``step`` of its pass."""
        b, size = self.trainer.replica_batch[i], self.trainer.shard_sizes[i]
        n_steps = min(self.round_steps, self.steps[i] - step)
        return max(min(n_steps * b, size - step * b), 0)

    def _scale(self, plan: RoundPlan, rows: int) -> float:
        """An update's share: its rows over those of that round of the pass on every replica."""
        step = plan.first_step
        return rows / sum(self._rows(j, step) for j in range(len(self.steps)))

    def _next_plan(self, i: int) -> tuple[RoundPlan, int] | None:
        """Replica ``i``'s next round and its rows, or ``None`` if it must not start one now."""
        if self.rows_left <= 0:
            return None
        bound = getattr(self.strategy, "staleness", None)
        if bound is not None and self.started[i] - min(c[2] for c in self.cursors) > bound:
            return None  # too far ahead of the slowest replica
        t = self.trainer
        passes, step, _ = self.cursors[i]
        if any(r == i for r, *_ in self.inflight.values()):
            return None
        n_steps = min(self.round_steps, self.steps[i] - step)
        plan = RoundPlan(t.run_id, i, passes, self.started[i], step, n_steps,
                         t.replica_batch[i], self.lr,
                         t.random_state, t.shuffle,
                         dask.config.get("daskdist.driver.max-non-finite"), self.steps[i],
                         getattr(self.strategy, "compression", None),
                         getattr(self.strategy, "density", 0.01))
        return plan, self._rows(i, step)

    def _launch(self) -> None:
        """Start a round on every replica that may start one."""
        t = self.trainer
        for i in range(len(t.shards)):
            nxt = self._next_plan(i)
            if nxt is None:
                continue
            plan, rows = nxt
            worker = t.replica_workers[i]
            future = self.client.submit(
                self.round_task, t.spec_future, t.shards[i], self.global_state, plan, pure=False,
                key=t.task_key("round", plan.round, i, epoch=t.epoch),
                workers=[worker], allow_other_workers=True)
            fetched = self.global_worker is not None and self.global_worker != worker
            self.inflight[future] = (i, plan, self.version, rows, int(fetched))
            self.started[i] += 1
            self.rows_left -= rows

    def _apply(self, future) -> None:
        """Submit the task that applies a finished round's delta: the next version."""
        t = self.trainer
        i, plan, started_from, rows, fetched = self.inflight.pop(future)
        worker = t.replica_workers[i]
        self._advance(i, plan)
        record = {"run": t.run_id, "epoch": t.epoch, "replica": i, "rows": rows,
                  "staleness": self.version - started_from}
        self._submit_version(
            apply_update, [self.global_state, future], worker, plan,
            scales=(self._scale(plan, rows),), record=record,
            transfers=fetched + int(self.global_worker not in (None, worker)))

    def _advance(self, i: int, plan: RoundPlan) -> None:
        """Move replica ``i``'s cursor past its finished round ``plan``."""
        passes, step = plan.epoch, plan.first_step + plan.n_steps
        if step >= self.steps[i]:
            passes, step = passes + 1, 0
        self.cursors[i] = (passes, step, plan.round + 1)

    def _submit_version(self, task, args: list, worker: str, plan: RoundPlan, **kwargs) -> None:
        """Submit ``task(*args, **kwargs, cursors=, plan=)`` on ``worker``: the next version."""
        t = self.trainer
        self.global_state = self.client.submit(
            task, *args, pure=False, cursors=tuple(self.cursors),
            plan=replace(plan, round=self.version, epoch=t.epoch),
            key=t.task_key("apply", self.version, epoch=t.epoch),
            workers=[worker], allow_other_workers=True, **kwargs)
        self.global_worker = worker
        self.version += 1
        t._latest = self.global_state
        t._track((self.version, self.global_state))

    def _check(self, future) -> None:
        """Raise if a replica's round failed or was lost with its worker."""
        if future.status == "finished":
            return
        if future.status in ("cancelled", "lost"):
            raise WorkerLost(f"round {future.key} was lost with a worker")
        try:
            error = future.exception()  # (done: returns at once)
        except FutureCancelledError:
            raise WorkerLost(f"round {future.key} was lost with a worker") from None
        if isinstance(error, KilledWorker):
            raise self.trainer._shard_failed(error) from error
        raise error

    def _wait_some(self) -> list:
        """The round futures that finished (waits for at least one), oldest first."""
        done = self.trainer.wait(list(self.inflight), return_when="FIRST_COMPLETED")
        return [f for f in self.inflight if f in done]

    def run(self) -> None:
        try:
            self._launch()
            while self.inflight:
                for future in self._wait_some():
                    self._check(future)
                    self._apply(future)
                    self._launch()
        except BaseException:
            self._release_inflight()
            raise
        self._close()

    def _release_inflight(self) -> None:
        """Stop the rounds in flight (the epoch was interrupted, or a worker lost)."""
        for future in self.inflight:
            future.release()
        self.inflight.clear()

    def _close(self) -> None:
        """Leave the trainer with the epoch's final state: the newest version, closed."""
        t = self.trainer
        t._state = self.client.submit(close_epoch, self.global_state, t.epoch, pure=False,
                                      key=t.task_key("close", epoch=t.epoch))
        t.round = self.version
        t._track((self.version, t._state))
