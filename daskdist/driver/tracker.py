"""The round outputs the driver watches, a few rounds behind the workers.

A strategy *tracks* each round's output (the future whose completion ends
the round) with the state round it stands for. The tracker keeps at most
``lookahead`` of them in flight: tracking one more *settles* the oldest,
which waits for it and raises if it failed or was lost. It also keeps the
two newest settled outputs: a round's state lives on one worker (the root of
its average rotates over the workers), so when that worker dies the round
before it is still held by another, and a recovery loses one finished round.
"""

from __future__ import annotations

from collections import deque

from distributed import KilledWorker
from distributed.client import FutureCancelledError

from .. import interrupt
from ..errors import StateLost, WorkerLost
from .waiting import LOST

__all__ = ["RoundTracker", "raise_failure"]


def raise_failure(future, error, shard_failed) -> None:
    """Raise the driver's answer to a round output that did not finish.

    Parameters
    ----------
    future : distributed.Future
        The output, done (finished, failed, or lost with a worker).
    error : BaseException or None
        Its exception, if it failed.
    shard_failed : callable
        ``shard_failed(KilledWorker) -> ShardFailedError``, naming the shard
        of a task Dask gave up on.
    """
    if future.status in LOST:
        raise WorkerLost(f"training state {future.key} was lost with a worker")
    if isinstance(error, StateLost):
        raise WorkerLost(str(error))
    if isinstance(error, KilledWorker):
        raise shard_failed(error) from error
    if error is not None:
        raise error


class RoundTracker:
    """Tracked round outputs: ``(state round, future)`` pairs, oldest first.

    Parameters
    ----------
    waiter : daskdist.driver.waiting.Waiter
        Waits on the futures.
    lookahead : int
        Outputs kept in flight before the oldest is settled.
    shard_failed : callable
        See :func:`raise_failure`.
    """

    def __init__(self, waiter, lookahead: int, shard_failed):
        self.waiter = waiter
        self.lookahead = lookahead
        self.shard_failed = shard_failed
        self.inflight: deque = deque()
        self.settled: deque = deque(maxlen=2)
        #: ``hook(state_round, future)``, called for each settled output.
        self.on_settle = None
        #: ``watch()``, called after each settled output that can be resumed from; it may
        #: raise to stop the epoch's loop there.
        self.watch = None
        #: state round -> ``(future, (round, round output, plans))`` of resumable outputs.
        self.resumes: dict = {}

    def reset(self, state_round: int, future) -> None:
        """Start again from one held state (the fit's start, or a recovery)."""
        self.inflight.clear()
        self.settled.clear()
        self.resumes.clear()
        self.settled.append((state_round, future))

    def track(self, state_round: int, future, resume: tuple | None = None) -> None:
        """Watch ``future``; settle the oldest output beyond the look-ahead.

        ``resume``: what ends the epoch after it (:meth:`EpochContext.track`).
        """
        self.inflight.append((state_round, future))
        if resume is not None:
            self.resumes[state_round] = (future, resume)
        while len(self.inflight) > self.lookahead:
            self.settle(self.inflight.popleft())

    def settle_all(self) -> None:
        """Settle every output in flight."""
        while self.inflight:
            self.settle(self.inflight.popleft())

    def settle(self, item) -> None:
        """Wait for a tracked output; raise if it failed or was lost."""
        interrupt.raise_if_interrupted()
        _, future = item
        try:
            error = self.waiter.exception(future)
        except FutureCancelledError:
            error = None
        if future.status != "finished" or error is not None:
            raise_failure(future, error, self.shard_failed)
        self.settled.append(item)
        if self.on_settle is not None:
            self.on_settle(*item)
        for older in [r for r in self.resumes if r < item[0]]:  # only the newest settled
            del self.resumes[older]
        if self.watch is not None and item[0] in self.resumes:
            self.watch()

    def drop_after(self, state_round: int) -> None:
        """Stop watching the outputs of state rounds after ``state_round`` (re-planned)."""
        self.inflight = deque(item for item in self.inflight if item[0] <= state_round)
        self.resumes = {r: v for r, v in self.resumes.items() if r <= state_round}

    def held(self) -> list:
        """Every output the driver holds, oldest first."""
        return [*self.settled, *self.inflight]

    def newest_finished(self) -> int | None:
        """The newest state round known to have finished (settled ones count even if lost)."""
        rounds = [r for r, _ in self.settled] + [r for r, f in self.inflight
                                                 if f.status == "finished"]
        return max(rounds, default=None)

    def clear(self) -> None:
        """Let go of every output (the run ends)."""
        self.inflight.clear()
        self.settled.clear()
        self.resumes.clear()
