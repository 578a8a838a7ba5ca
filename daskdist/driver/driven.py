"""The base of strategies that drive their own epoch (``ddp``, ``pipeline``, ``async``, ...).

The default round loop (:mod:`daskdist.driver.round_loop`) submits rounds
ahead and lets the driver settle them; a strategy whose epoch is one long
task per worker (``ddp``), a schedule of pinned tasks (``pipeline``) or a
loop that reacts to each arriving update (``async``, ``ssp``, deadlines)
subclasses :class:`DrivenEpoch` instead and writes :meth:`DrivenEpoch.drive`.
The skeleton is shared: run, let go of what the attempt holds if it fails
(the driver then recovers or raises), and tell the driver when a worker the
epoch needs is gone.
"""

from __future__ import annotations

__all__ = ["DrivenEpoch", "LIVENESS_S"]

#: Seconds between a driven epoch's checks that its workers are alive.
LIVENESS_S = 1.0


class DrivenEpoch:
    """One attempt at an epoch that a strategy drives itself.

    Parameters
    ----------
    strategy : daskdist.strategies.Strategy
        The strategy (its options).
    ctx : daskdist.driver.context.EpochContext
        The driver, as the strategy sees it.
    """

    def __init__(self, strategy, ctx):
        self.strategy = strategy
        self.ctx = ctx
        self.held: list = []  # futures to let go of when the attempt fails

    def run(self) -> None:
        """Drive the epoch; on any failure let go of what it holds, then re-raise."""
        try:
            self.drive()
        except BaseException:
            for future in self.held:
                future.release()
            self.held.clear()
            raise

    def drive(self) -> None:
        """Submit and follow the epoch's work; end with ``ctx.finish``."""
        raise NotImplementedError

    def hold(self, future):
        """Keep ``future`` until the epoch ends (released if it fails); returns it."""
        self.held.append(future)
        return future

    def check_alive(self, workers: dict) -> None:
        """Report the first of ``workers`` (description -> address) that left the cluster."""
        live = set(self.ctx.live_workers())
        for what, worker in workers.items():
            if worker not in live:
                self.ctx.lost(f"worker {worker} ({what}) left")

    def wait_alive(self, future, workers: dict) -> None:
        """Wait for ``future``, checking every second that ``workers`` are alive."""
        while not self.ctx.wait([future], timeout=LIVENESS_S):
            self.check_alive(workers)
