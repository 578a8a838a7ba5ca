"""Tasks queued by the driver and sent to the scheduler as one graph.

Strategies submit a round's tasks one by one; sending them one ``submit`` at
a time costs the client and the scheduler far more per task than one graph
of several rounds. :class:`TaskQueue` collects them as placeholders (later
tasks of the same flush take earlier ones as arguments) and sends them
together, each placed on its worker.
"""

from __future__ import annotations

import weakref

import dask
from dask.delayed import Delayed
from distributed import Future

from .. import interrupt

__all__ = ["TaskQueue", "resolve", "release"]


class TaskQueue:
    """Queued tasks of one run, and the futures sent for them.

    Every future the queue hands out is remembered weakly, so that
    :meth:`release_pending` can stop the ones still running when an epoch
    is given up, without keeping finished rounds alive.
    """

    def __init__(self, client):
        self.client = client
        self._queued: list = []
        self._placement: dict = {}
        self._priority: dict = {}
        self._sent: weakref.WeakSet = weakref.WeakSet()

    def submit(self, func, *args, key, worker: str, priority: int = 0, **kwargs) -> Delayed:
        """Queue ``func(*args, **kwargs)`` as task ``key``, placed on ``worker``.

        Returns a placeholder that later tasks of the same flush may take as
        an argument. Of the tasks ready on a worker, those of higher
        ``priority`` run first (Dask's task priority).
        """
        task = dask.delayed(func, pure=False)(*args, dask_key_name=key, **kwargs)
        self._queued.append(task)
        self._placement[key] = [worker]
        self._priority[key] = priority
        return task

    def flush(self, strict: bool = False) -> dict:
        """Send the queued tasks as one graph; return their futures by key.

        With ``strict``, each task runs on its worker only (for tasks that
        need what an earlier task left in that worker's memory); otherwise it
        may run elsewhere when its worker is gone or busy.
        """
        interrupt.raise_if_interrupted()
        if not self._queued:
            return {}
        # The placement travels as a callable annotation (key -> workers); it
        # is a builtin dict method, so the scheduler needs nothing of ours.
        with dask.annotate(workers=self._placement.__getitem__,
                           priority=self._priority.__getitem__,
                           allow_other_workers=not strict):
            futures = self.client.compute(self._queued, optimize_graph=False)
        self._queued, self._placement, self._priority = [], {}, {}
        self._sent.update(futures)
        return {f.key: f for f in futures}

    def submit_now(self, func, *args, key, worker: str | None, strict: bool = False,
                   priority: int = 0, **kwargs) -> Future:
        """Submit ``func(*args, **kwargs)`` now (not queued); return its future."""
        placement = {} if worker is None else {"workers": [worker],
                                                "allow_other_workers": not strict}
        future = self.client.submit(func, *args, key=key, pure=False, priority=priority,
                                    **placement, **kwargs)
        self._sent.add(future)
        return future

    def release_rounds_after(self, round: int) -> None:
        """Forget the queued tasks; let go of the unfinished ones of rounds after ``round``.

        Round tasks are keyed ``(name, round, ...)``.
        """
        self.drop_queued()
        for future in list(self._sent):
            key = future.key
            if (isinstance(key, tuple) and len(key) > 1 and isinstance(key[1], int)
                    and key[1] > round and future.status == "pending"):
                future.release()

    def drop_queued(self) -> None:
        """Forget the tasks queued but not sent."""
        self._queued, self._placement, self._priority = [], {}, {}

    def release_pending(self) -> None:
        """Let go of every future handed out that has not finished (stops its task)."""
        self.drop_queued()
        for future in list(self._sent):
            if future.status == "pending":
                future.release()


def resolve(output, futures: dict):
    """Replace the placeholders in (nested lists and tuples of) ``output`` by their futures."""
    if isinstance(output, Delayed):
        return futures[output.key]
    if isinstance(output, (list, tuple)):
        return type(output)(resolve(o, futures) for o in output)
    return output


def release(outputs) -> None:
    """Release the unfinished futures in (nested lists of) round outputs."""
    if isinstance(outputs, Future):
        if outputs.status == "pending":
            outputs.release()
    elif isinstance(outputs, (list, tuple)):
        for output in outputs:
            release(output)
