"""Round deadlines: a synchronous round closes without the replicas that are late.

With ``strategy__deadline`` set, ``local_sgd`` and ``sync`` rounds are
driven from the client: every idle replica starts a round from the newest
global state and sends its update (for ``local_sgd`` the change its local
steps made, its delta, as under ``async``; for ``sync`` the gradient of its
slice of one step's batch); the round closes once all of them have sent
theirs, or once the deadline has passed and at least one has. The deadline
is ``deadline`` times the running median of recent rounds' durations (launch
to result, per replica, the last 16), measured during the fit, so it follows
the model, the batch size and the machine; rounds before that median exists
(the first round of a fit) have none. Of an even number of durations the
median is the lower middle one, so that with two replicas, one of them slow,
the deadline follows the fast one.

The round's new state is the old one plus the sample-weighted mean of the
deltas that arrived in time (for ``sync``: one optimizer step with the
sample-weighted mean of the gradients). A late replica is not stopped: its
update is folded into the first round that closes after it arrives (with the
updates of that round, weighted by its samples, as an update computed at an
older state: its staleness is recorded), and it starts its next round from
the newest state then. No update is lost and none is applied twice;
``rounds_`` counts, per round, the updates that missed its deadline
(``dropped``) and the history their sum per epoch (``dropped_updates``).

Replicas go through their shards at their own pace (the cursors of
:mod:`~daskdist.strategies.parameter_server`); an epoch ends once the
applied updates cover the training set, after the late rounds still running
have been applied.

With ``compression``, what a replica sends is packed as without a deadline
(``sync``: its gradient; ``local_sgd``: its parameters' delta, while buffers
and optimizer state travel as they are), with the replica's error-feedback
memory; the new state replicas fetch from the apply task stays full size.

(Chen et al. 2016, "Revisiting Distributed Synchronous
SGD", close each step without its slowest replicas and drop their updates;
here they are kept, and folded into a later round.)
"""


from __future__ import annotations

import statistics
import time

from ..worker.update_tasks import apply_deltas, local_delta
from .parameter_server import UpdateEpoch

__all__ = ["DeadlineEpoch", "DeadlineOption", "check_deadline"]

#: Round durations the running median looks back on.
WINDOW = 16


def check_deadline(deadline) -> None:
    """Raise ``ValueError`` unless ``deadline`` is None or a number greater than 1."""
    if deadline is None:
        return
    if isinstance(deadline, bool) or not isinstance(deadline, (int, float)) \
            or not deadline > 1:
        raise ValueError("deadline must be None or a number > 1 (a multiple of the running "
                         f"median of round durations), got {deadline!r}.")


class DeadlineEpoch(UpdateEpoch):
    """The driver's loop over one epoch of synchronous rounds with a deadline.

    ``round_task(spec, shard, state, plan)`` is a replica's round (its
    :class:`~daskdist.worker.replica.Contribution`), and ``apply_task(spec,
    state, *contributions, record=, cursors=, transfers=, plan=)`` makes the
    next global state of those that arrived in time.
    """

    def __init__(self, strategy, ctx, round_task=local_delta, apply_task=apply_deltas):
        super().__init__(strategy, ctx)
        self.round_task, self.apply_task = round_task, apply_task
        # (kept for the whole fit: the median spans epochs)
        self.durations = ctx.scratch.setdefault("round_durations", [])
        self.launched: dict = {}  # round future -> when it was submitted

    def _launch(self) -> list:
        """Start a round on every idle replica; return the new round futures."""
        new = super()._launch()
        now = time.monotonic()
        self.launched.update((f, now) for f in new)
        return new

    def _deadline_s(self) -> float | None:
        """Seconds a round may take: ``deadline`` times the running median."""
        if len(self.durations) < len(self.ctx.shards):
            return None
        return self.strategy.deadline * statistics.median_low(self.durations[-WINDOW:])

    def _wait_round(self, opened: list) -> list:
        """Wait for this round's replicas, or the deadline; return the futures done, in order."""
        limit = self._deadline_s()
        end = None if limit is None else time.monotonic() + limit
        done: list = []
        while True:
            pending = [f for f in self.inflight if f not in done]
            if done and (end is not None and time.monotonic() >= end
                         or all(f in done for f in opened)):
                return done
            if not pending:
                return done
            timeout = None if end is None or not done else max(end - time.monotonic(), 0.0)
            finished = self.ctx.wait(pending, "FIRST_COMPLETED", timeout=timeout)
            now = time.monotonic()
            for f in pending:
                if f in finished:
                    done.append(f)
                    self.durations.append(now - self.launched.pop(f))

    def _apply_round(self, done: list, dropped: int) -> None:
        """Submit the task that applies the round's deltas: the next version."""
        info = self.ctx.info
        done = sorted(done, key=lambda f: self.inflight[f][0])  # replica order: reproducible
        items = [self.inflight.pop(f) for f in done]
        for i, plan, *_ in items:
            self._advance(i, plan)
        worker = info.replica_workers[items[0][0]]
        record = {"run": info.run_id, "epoch": info.epoch,
                  "rows": sum(rows for *_, rows, _ in items),
                  "staleness": max(self.version - started for _, _, started, *_ in items),
                  "dropped": dropped}
        self._submit_version(
            self.apply_task, [self.ctx.spec, self.global_state, *done], worker, items[0][1],
            record=record, transfers=(sum(fetched for *_, fetched in items)
                                      + int(self.global_worker not in (None, worker))))

    def drive(self) -> None:
        while True:
            opened = self._launch()
            if not self.inflight:
                break
            done = self._wait_round(opened)
            for future in done:
                self.ctx.check(future)
            self._apply_round(done, dropped=sum(f not in done for f in opened))
        self._close()


class DeadlineOption:
    """Mixin of the strategies with a ``deadline`` option (``sync``, ``local_sgd``).

    With ``deadline`` set, the strategy's epochs run in a :class:`DeadlineEpoch`
    with the class's :attr:`deadline_tasks`, and its updates carry staleness;
    without, in the default round loop.
    """

    #: ``(round_task, apply_task)`` of a :class:`DeadlineEpoch`.
    deadline_tasks = (local_delta, apply_deltas)

    def check_deadline(self) -> None:
        """Raise ``ValueError`` for a bad ``deadline``."""
        check_deadline(self.deadline)

    @property
    def asynchronous(self) -> bool:
        """Whether updates may be applied to a newer state than they started from."""
        return self.deadline is not None

    def train_epoch(self, ctx) -> None:
        """With a deadline, the client's loop over the epoch's rounds; else the round loop."""
        if self.deadline is None:
            super().train_epoch(ctx)
            return
        round_task, apply_task = self.deadline_tasks
        DeadlineEpoch(self, ctx, round_task=round_task, apply_task=apply_task).run()
