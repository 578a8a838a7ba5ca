"""Overlapped rounds (``strategy__overlap=True``): how the driver queues them.

The maths and the replicas' tasks are in :mod:`daskdist.worker.overlap_tasks`.
A round's output is ``(results, previous)``: every replica's result of the
round, and of the round before (None in an epoch's first round). Round
``r`` of a replica takes, as Dask inputs, every replica's result of round
``r - 2`` (in an epoch's first two rounds, the epoch's starting state),
and reads its own result of round ``r - 1`` on its worker; so Dask sends
it to the worker while round ``r - 1`` still computes, and the worker
fetches the peers' results meanwhile. Each round's tasks carry a lower
priority than the previous round's, so that a worker runs a replica's
rounds in order.
"""

from __future__ import annotations

from ..worker.overlap_tasks import finish_overlap, overlap_round

__all__ = ["submit_overlapped", "finish_overlapped"]


def submit_overlapped(ctx, state, plans):
    """Queue one overlapped round; return ``(results, previous)``.

    ``state`` is the epoch's starting state (a future) or the previous
    round's output.
    """
    workers = list(ctx.info.replica_workers)
    latest, previous = state if isinstance(state, tuple) else (None, None)
    round_ = plans[0].round
    after = ctx.key("round", round_ - 1)[0]  # the previous round's tasks (name of their keys)
    results = []
    # every replica's results of round r - 2, or the epoch's starting state
    inputs = [ctx.state] if previous is None else previous
    options = {} if latest is None else {"after": after}  # our own of round r - 1, kept
    for p in plans:
        results.append(ctx.submit(
            overlap_round, ctx.spec, ctx.shards[p.replica], *inputs, plan=p,
            replica_workers=workers, key=ctx.key("round", round_, p.replica),
            worker=workers[p.replica], priority=ctx.info.first_round - round_, **options))
    return (results, latest)


def finish_overlapped(ctx, round_output, plans):
    """Queue the task that folds an epoch's last two rounds into its final state."""
    latest, previous = round_output
    workers = list(ctx.info.replica_workers)
    return ctx.submit(finish_overlap, ctx.spec, *latest, *(previous or ()),
                      n_replicas=len(latest), replica_workers=workers,
                      key=ctx.key("average", plans[0].round), worker=workers[0])
