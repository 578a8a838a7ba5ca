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
applied (:attr:`~daskdist.state.TrainingState.cursors`); when the replicas
change between epochs (:mod:`daskdist.driver.membership`), every replica
starts a fresh pass over its new shard. An epoch ends once
the updates applied in it cover as many samples as the training set; a fast
replica then has trained on more of its shard (going on into its next pass)
than a slow one. At the end of an epoch the driver lets the rounds in flight
finish and applies them, so each epoch's state holds every update started in
it.

*Staleness* of an update: the global version it is applied to, minus the
version its replica started from (how many other updates arrived meanwhile).
"""


from __future__ import annotations

from dataclasses import replace

import numpy as np

from ..driver.driven import DrivenEpoch
from ..plan import RoundPlan
from ..worker.update_tasks import apply_update, close_epoch, local_delta, progress
from .base import Strategy

__all__ = ["ParameterServer", "UpdateEpoch"]


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

    def round_steps(self) -> int:
        return self.sync_every

    def staleness_bound(self) -> int | None:
        return self.staleness

    def rounds_per_epoch(self, steps_per_epoch: int, n_replicas: int) -> int:
        # one row per update: each replica's rounds, when they go at the same pace
        return n_replicas * len(self.round_sizes(steps_per_epoch))

    def train_epoch(self, ctx) -> None:
        """Run one epoch of updates."""
        UpdateEpoch(self, ctx).run()


class UpdateEpoch(DrivenEpoch):
    """The driver's loop over one epoch of a parameter-server strategy.

    ``round_task(spec, shard, state, plan) -> Contribution`` is a replica's
    round; each finished round's update is applied by an ``apply`` task to
    the newest global state (:meth:`_apply`), and the replica starts its next
    round from the version that makes.
    """

    #: A replica's round.
    round_task = staticmethod(local_delta)

    def __init__(self, strategy, ctx):
        super().__init__(strategy, ctx)
        info = ctx.info
        self.round_steps = strategy.round_steps()
        n = len(ctx.shards)
        self.steps = [int(np.ceil(size / b))
                      for size, b in zip(info.shard_sizes, info.replica_batch)]
        version, cursors, rows_done = ctx.submit(
            progress, ctx.state, info.epoch, key=ctx.key("progress", info.round, epoch=False),
            worker=None, queue=False).result()
        if len(cursors) != n:  # a new fit, or one on other replicas: start every pass afresh
            cursors = ((0, 0, 0),) * n
        self.version = version
        self.cursors = [tuple(c) for c in cursors]
        self.rows_left = sum(info.shard_sizes) - rows_done
        self.global_state = ctx.state
        self.global_worker = None  # where the newest version is (None: sent from the client)
        # round future -> (replica, plan, version started from, rows, whether the replica
        # fetched that version from another worker)
        self.inflight: dict = {}
        self.started = [c[2] for c in self.cursors]  # rounds started, per replica

    # -- rounds ---------------------------------------------------------------------------------
    def _rows(self, i: int, step: int) -> int:
        """Rows of replica ``i``'s round that starts at ``step`` of its pass."""
        info = self.ctx.info
        b, size = info.replica_batch[i], info.shard_sizes[i]
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
        bound = self.strategy.staleness_bound()
        if bound is not None and self.started[i] - min(c[2] for c in self.cursors) > bound:
            return None  # too far ahead of the slowest replica
        passes, step, _ = self.cursors[i]
        if any(r == i for r, *_ in self.inflight.values()):
            return None
        n_steps = min(self.round_steps, self.steps[i] - step)
        plan = self.ctx.plan(i, round=self.started[i], first_step=step, n_steps=n_steps,
                             epoch=passes, epoch_steps=self.steps[i],
                             compression=self.strategy.compression,
                             density=self.strategy.density)
        return plan, self._rows(i, step)

    def _launch(self) -> list:
        """Start a round on every replica that may start one; return the new round futures."""
        ctx, new = self.ctx, []
        for i in range(len(ctx.shards)):
            nxt = self._next_plan(i)
            if nxt is None:
                continue
            plan, rows = nxt
            worker = ctx.info.replica_workers[i]
            future = ctx.submit(self.round_task, ctx.spec, ctx.shards[i], self.global_state,
                                plan, key=ctx.key("round", plan.round, i), worker=worker,
                                queue=False)
            fetched = self.global_worker is not None and self.global_worker != worker
            self.inflight[future] = (i, plan, self.version, rows, int(fetched))
            self.started[i] += 1
            self.rows_left -= rows
            new.append(future)
        return new

    def _apply(self, future) -> None:
        """Submit the task that applies a finished round's delta: the next version."""
        info = self.ctx.info
        i, plan, started_from, rows, fetched = self.inflight.pop(future)
        worker = info.replica_workers[i]
        self._advance(i, plan)
        record = {"run": info.run_id, "epoch": info.epoch, "replica": i, "rows": rows,
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
        ctx = self.ctx
        self.global_state = ctx.submit(
            task, *args, cursors=tuple(self.cursors),
            plan=replace(plan, round=self.version, epoch=ctx.info.epoch),
            key=ctx.key("apply", self.version), worker=worker, queue=False, **kwargs)
        self.global_worker = worker
        self.version += 1
        ctx.track(self.version, self.global_state)

    def _wait_some(self) -> list:
        """The round futures that finished (waits for at least one), oldest first."""
        done = self.ctx.wait(list(self.inflight), return_when="FIRST_COMPLETED")
        return [f for f in self.inflight if f in done]

    def drive(self) -> None:
        self._launch()
        while self.inflight:
            for future in self._wait_some():
                self.ctx.check(future)
                self._apply(future)
                self._launch()
        self._close()

    def _close(self) -> None:
        """End the epoch with its final state: the newest version, closed."""
        ctx = self.ctx
        final = ctx.submit(close_epoch, self.global_state, ctx.info.epoch,
                           key=ctx.key("close"), worker=None, queue=False)
        ctx.track(self.version, final)
        ctx.finish(final, self.version)
