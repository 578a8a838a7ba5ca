"""The default round loop: an epoch's rounds submitted a few ahead of the workers.

``sync``, ``local_sgd`` and ``hierarchical`` plug into it
(:class:`~daskdist.strategies.base.RoundStrategy`): for each round the loop
builds every replica's plan and asks the strategy to queue the round's tasks
(``submit_round``); rounds go to the scheduler in graphs of half the
look-ahead, so that the workers never wait on the client between rounds and
the client and scheduler pay little per task; each round's output is tracked,
and the driver settles them in order ``lookahead`` rounds behind, letting go
of old rounds so that the task graph does not grow with the run.
"""

from __future__ import annotations

__all__ = ["run_rounds"]


def run_rounds(ctx, strategy) -> None:
    """Run the rounds of ``ctx``'s epoch that its state does not hold yet.

    Every round is tracked with what would end the epoch after it
    (``resume``), so that the driver can stop the loop between two rounds
    when workers join or leave (:mod:`daskdist.driver.membership`).

    Parameters
    ----------
    ctx : daskdist.driver.context.EpochContext
        The driver, as the strategy sees it.
    strategy : daskdist.strategies.base.RoundStrategy
        What each round does.
    """
    info = ctx.info
    per_flush = max(1, info.lookahead // 2)
    sizes = strategy.round_sizes(info.steps_per_epoch)
    first, plans = sum(sizes[:info.done]), None
    round_, state, queued = info.round, ctx.state, []
    for steps in sizes[info.done:]:
        plans = [ctx.plan(i, round=round_, **_steps(info, i, first, steps),
                          **strategy.plan_fields())
                 for i in range(len(ctx.shards))]
        state = strategy.submit_round(ctx, state, plans)
        queued.append((round_, plans, state))
        first += steps
        round_ += 1
        if len(queued) == per_flush:
            state = _flush(ctx, strategy, state, queued)
    if plans is None:  # the state already holds every round of the epoch
        ctx.finish(ctx.state, round_)
        return
    final = _flush(ctx, strategy, strategy.finish_epoch(ctx, state, plans), queued)
    ctx.finish(final, round_)


def _steps(info, replica: int, first: int, steps: int) -> dict:
    """A replica's steps of the round that starts at the epoch's step ``first``.

    Balanced replicas (``info.replica_steps``) take their own number of
    steps per round; the epoch's ``steps_per_epoch`` is then ``steps`` times
    its rounds.
    """
    if info.replica_steps is None:
        return {"first_step": first, "n_steps": steps}
    k = info.replica_steps[replica]
    return {"first_step": first // steps * k, "n_steps": k,
            "epoch_steps": info.steps_per_epoch // steps * k, "schedule_stride": steps / k}


def _flush(ctx, strategy, state, queued: list):
    """Send the queued rounds, track their outputs; return ``state`` as futures."""
    state, outputs = ctx.flush((state, [output for _, _, output in queued]))
    rounds = [(round_, plans) for round_, plans, _ in queued]
    queued.clear()
    for (round_, plans), output in zip(rounds, outputs):
        ctx.track(strategy.state_round(round_), strategy.tracked(output),
                  resume=(round_, output, plans))
    return state
