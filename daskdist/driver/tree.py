"""Averaging trees: a round's contributions reduced to one state by a tree of tasks.

Replicas' contributions never travel through the client. The driver submits
``daskdist-average`` tasks that sum pairs of contributions on the worker that
holds the first of them, level by level (:func:`daskdist.worker.aggregation.combine`),
and a final task (the strategy's *finalize*) that turns the sum into the next
training state.
"""

from __future__ import annotations

from ..worker.aggregation import combine

__all__ = ["submit_tree"]


def submit_tree(submit, parts, workers, finalize, *args, key, round_index: int,
                fan_in: int = 2, **kwargs):
    """Reduce contribution futures to one future with a tree of tasks.

    Parameters
    ----------
    submit : callable
        ``submit(func, *args, key=, worker=, **kwargs)``, as
        :meth:`daskdist.driver.context.EpochContext.submit` (queued).
    parts : list of Future or Delayed
        One contribution per replica.
    workers : list of str
        The worker each contribution is expected on (tree nodes are placed
        with the first input they sum, the root rotating over the workers
        from round to round; placement falls back to any worker).
    finalize : callable
        ``finalize(*args, *partials, **kwargs)``: the root task, given at most
        ``fan_in`` partial sums.
    key : callable
        ``key(round_index, *position)`` gives the key of a tree node (the
        root's position is empty).
    round_index : int
        The round (also rotates the root over the workers).
    fan_in : int
        Inputs per tree node.

    Returns
    -------
    Future or Delayed
        The root's result.
    """
    level = 0
    # The root's worker does the round's extra work (the final average, and
    # serving the new state to the others): rotate it over the workers.
    shift = round_index % len(parts)
    parts = list(parts[shift:]) + list(parts[:shift])
    workers = list(workers[shift:]) + list(workers[:shift])
    while len(parts) > fan_in:
        next_parts, next_workers = [], []
        for j in range(0, len(parts), fan_in):
            group = parts[j:j + fan_in]
            if len(group) == 1:
                next_parts.append(group[0])
            else:
                next_parts.append(submit(
                    combine, *group, key=key(round_index, level, j),
                    worker=workers[j]))
            next_workers.append(workers[j])
        parts, workers, level = next_parts, next_workers, level + 1
    return submit(finalize, *args, *parts, **kwargs,
                  key=key(round_index), worker=workers[0])
