"""Overlapped rounds (``strategy__overlap=True``): how the driver queues them.

The maths and the replicas' tasks are in :mod:`daskdist.worker.overlap_tasks`.
A round's output is a tuple of result lists, newest first: every replica's
result of the round, then of each earlier round whose mean is still pending
(``late`` of them: 1 under ``local_sgd`` and ``diloco``, 2 under
``hierarchical``). Round ``r`` of a replica takes, as Dask inputs, what
forms the mean of round ``r - 1 - late`` (in an epoch's first ``late + 1``
rounds, the epoch's starting state): every replica's result of that round,
or, with groups, the replica's own result of it and every group's sum of it
(:func:`~daskdist.worker.overlap_means.group_sum`, on the group's first
worker). It reads its own result of round ``r - 1`` on its worker. So Dask
sends it to the worker while round ``r - 1`` still computes, and the worker
fetches what it needs meanwhile. Each round's tasks carry a lower priority
than the previous round's, so that a worker runs a replica's rounds in
order; a group's sum carries its round's priority, so that it runs on the
group's first worker between two of its rounds, before the next one.
"""

from __future__ import annotations

from ..worker.overlap_means import group_sum
from ..worker.overlap_tasks import finish_overlap, overlap_round

__all__ = ["submit_overlapped", "finish_overlapped"]


def submit_overlapped(ctx, state, plans, groups=None):
    """Queue one overlapped round; return its result lists, newest first.

    ``state`` is the epoch's starting state (a future) or the previous
    round's output. ``groups`` (``hierarchical``): replica indices of each
    group, whose sums are formed on the group's first worker and folded
    two rounds late.
    """
    workers = list(ctx.info.replica_workers)
    late = 1 if groups is None else 2
    history = state if isinstance(state, tuple) else ()
    round_ = plans[0].round
    folded = history[late] if len(history) > late else None  # round r - 1 - late
    options = {} if groups is None else {"late": late}
    if history:  # our own of round r - 1, kept
        options["after"] = ctx.key("round", round_ - 1)[0]
    first = ctx.info.first_round
    if folded is None:
        inputs = [[ctx.state] for _ in plans]
    elif groups is None:
        inputs = [folded for _ in plans]
    else:
        folded_round = round_ - 1 - late
        sums = [ctx.submit(group_sum, *[folded[i] for i in group],
                           key=ctx.key("average", folded_round, 0, g),
                           worker=workers[group[0]], priority=first - folded_round)
                for g, group in enumerate(groups)]
        inputs = [[folded[p.replica], *sums] for p in plans]
    results = [
        ctx.submit(overlap_round, ctx.spec, ctx.shards[p.replica], *args, plan=p,
                   replica_workers=workers, key=ctx.key("round", round_, p.replica),
                   worker=workers[p.replica], priority=first - round_, **options)
        for p, args in zip(plans, inputs)]
    return (results, *history[:late])


def finish_overlapped(ctx, round_output, plans):
    """Queue the task that folds an epoch's pending rounds into its final state."""
    workers = list(ctx.info.replica_workers)
    pending = [r for results in round_output for r in results]
    return ctx.submit(finish_overlap, ctx.spec, *pending, n_replicas=len(round_output[0]),
                      replica_workers=workers, key=ctx.key("average", plans[0].round),
                      worker=workers[0])
