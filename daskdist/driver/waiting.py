"""Waiting on futures from the driver, safely.

Every wait of the driver goes through :class:`Waiter`: it is a safe point for
Ctrl-C (an interrupt a finalizer swallowed is raised here), and while it
waits it gets this run's tasks out of ``no-worker`` when they wait for
workers that are gone (:func:`daskdist._compat.reschedule_stranded`).
"""

from __future__ import annotations

import logging
import time

import distributed
from distributed.client import FuturesCancelledError

from .. import interrupt
from .._compat import reschedule_stranded, task_state

__all__ = ["Waiter", "LOST", "POLL_S"]

logger = logging.getLogger(__name__)

#: Future states that mean the data is gone rather than still coming.
LOST = ("cancelled", "lost")
#: Scheduler task states of a key on its way (again).
_COMING = ("waiting", "queued", "processing", "no-worker", "memory")
#: Seconds between checks on a future that takes long.
POLL_S = 2


class Waiter:
    """Waits on the futures of one run.

    Parameters
    ----------
    client : distributed.Client
    run_id : str
        The run whose stranded tasks are rescheduled while waiting.
    """

    def __init__(self, client, run_id: str):
        self.client = client
        self.run_id = run_id

    def wait(self, futures, return_when: str = "ALL_COMPLETED",
             timeout: float | None = None) -> set:
        """Wait for all (or the first) of ``futures``; return those done.

        Futures lost with a worker count as done (their status says so).
        After ``timeout`` seconds (None: no limit) returns those done so far,
        maybe none. An interrupt that a finalizer swallowed meanwhile is
        raised here, however the wait ends.
        """
        end = None if timeout is None else time.monotonic() + timeout
        while True:
            interrupt.raise_if_interrupted()
            poll = POLL_S if end is None else min(POLL_S, max(end - time.monotonic(), 0.0))
            try:
                with self.client.as_current():
                    done, _ = distributed.wait(futures, timeout=poll, return_when=return_when)
            except FuturesCancelledError:
                done = {f for f in futures if f.status != "pending"}
            except TimeoutError:
                if end is None or time.monotonic() < end:
                    self.reschedule_stranded()
                    continue
                done = {f for f in futures if f.done()}
            interrupt.raise_if_interrupted()
            return done

    def exception(self, future):
        """``future.exception()``, which also returns once the scheduler gave the key up.

        A future whose data went with a worker is "lost" until the scheduler
        computes it again, and waiting on it blocks until then; when its
        inputs were let go too, the scheduler forgets it and that is never.
        """
        while True:
            try:
                return future.exception(timeout=POLL_S)  # waits without fetching the data
            except TimeoutError:
                interrupt.raise_if_interrupted()
                if future.status in LOST and not self.coming(future.key):
                    return None
                self.reschedule_stranded()

    def coming(self, key) -> bool:
        """Whether the scheduler is computing ``key`` (again)."""
        return self.client.run_on_scheduler(task_state, key) in _COMING

    def reschedule_stranded(self) -> None:
        """Get this run's tasks out of ``no-worker`` when they wait for workers that are gone.

        That happens to a task recomputed while no worker was running (every
        worker died at once, and new ones came): the scheduler would keep it
        waiting for its old worker.
        """
        keys = self.client.run_on_scheduler(reschedule_stranded, f"-{self.run_id}-")
        if keys:
            logger.warning("daskdist run %s: rescheduled %d task(s) that waited for workers "
                           "that are gone: %s", self.run_id, len(keys), keys[:4])
