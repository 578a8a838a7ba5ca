"""Replicas of mixed speed balanced: shard sizes and local steps that follow measured speed.

With ``strategy__balance=True`` (``local_sgd``, ``hierarchical``,
``diloco``), the driver measures each replica's speed over the epoch that
just ended (samples per second of its own compute, from the round log's
per-replica records) and, when the replicas would not finish a round within
:data:`SPREAD` of one another, re-plans before the next epoch:

- replica ``i`` takes ``k_i`` local steps per round instead of
  ``sync_every``, with ``k_i`` proportional to its batches per second
  ``v_i / b_i`` (whole, at least 1, about ``sync_every`` on average; see
  :func:`local_steps`), so that every replica's round takes about the same
  time ``k_i * b_i / v_i``;
- its shard holds a share of the training rows proportional to ``k_i * b_i``
  (the rows it trains on per round), so that every replica goes through its
  shard in the same number of rounds and no replica's rows are visited less
  often than another's (:func:`daskdist.data.replan.replan` moves only the
  rows that must move, on the workers).

The maths. Each round every replica starts from the same parameters
``w`` and takes its own number of local steps; the average weights replica
``i`` by the samples it trained on, ``n_i = k_i * b_i``:
``w' = sum_i n_i * w_i / sum_i n_i``. This is the weighted parameter
averaging of local SGD with heterogeneous local steps (the FedAvg average
of McMahan et al. 2017, weighted by samples, with per-client local work as
in FedNova's analysis, Wang et al. 2020, arXiv 2007.07481): it weights each
replica's trajectory by the data behind it, so every training row counts
the same whatever replica holds it. Its known bias: a replica that takes
more local steps moves further from ``w`` and so weighs more in direction
than its samples alone; with equal learning rates and ``k_i`` within a few
times of one another this stays small (FedNova's normalised average removes
it; measured here, accuracy stays within a point of the unbalanced fit).

A per-step schedule (:mod:`daskdist.schedules`) is sized for the epoch's
``sync_every * rounds`` steps; replica ``i``'s ``j``-th step of the epoch
reads the table's row ``floor(j * sync_every / k_i)``, the same point of the
epoch for every replica (:attr:`daskdist.plan.RoundPlan.schedule_stride`).

Balancing is undone when the replicas change (a worker joins or leaves):
the next epoch is planned evenly and measured again.
"""

from __future__ import annotations

import logging

from . import reshard

__all__ = ["SPREAD", "measured_speeds", "local_steps", "rebalance"]

logger = logging.getLogger(__name__)

#: Predicted spread of round times (slowest over fastest, minus 1) that triggers a re-plan.
SPREAD = 0.10


def measured_speeds(log, since_round: int = 0) -> dict[int, float]:
    """Samples per second of each replica's compute, over ``log``'s rounds from ``since_round``."""
    totals: dict = {}
    for record in log:
        if record["round"] < since_round:
            continue
        for replica, _loss, samples, compute_s in record.get("per_replica", ()):
            done, seconds = totals.get(replica, (0.0, 0.0))
            totals[replica] = (done + samples, seconds + compute_s)
    return {r: done / seconds for r, (done, seconds) in totals.items() if done and seconds > 0}


def local_steps(speeds, batch, sync_every: int) -> list[int]:
    """Each replica's local steps per round: in proportion to its batches per second.

    Steps are whole, so the round times ``k_i / r_i`` (``r_i``: replica
    ``i``'s batches per second) cannot all be equal. Of the round times
    ``T = k / r_i`` that put some replica at ``k`` steps, the one is chosen
    whose rounded steps (at least 1, at most ``3 * sync_every``) best trade
    the spread of round times (weighed double) against their mean's distance
    from ``sync_every`` (relative).
    """
    rates = [v / b for v, b in zip(speeds, batch)]
    cap = 3 * sync_every
    best, best_score = None, None
    for rate in rates:
        for k in range(1, cap + 1):
            steps = [min(cap, max(1, round(k / rate * r))) for r in rates]
            times = [s / r for s, r in zip(steps, rates)]
            spread = max(times) / min(times) - 1
            score = abs(sum(steps) / len(steps) - sync_every) / sync_every + 2 * spread
            if best_score is None or score < best_score:
                best, best_score = steps, score
    return best


def rebalance(trainer) -> dict | None:
    """Before an epoch: re-plan shard sizes and local steps to the replicas' measured speeds.

    Returns what changed (``{"epoch", "steps", "rows"}``), or None when the
    strategy does not balance, a replica has no measurement yet, or the
    replicas already finish their rounds within :data:`SPREAD`.
    """
    strategy = trainer.strategy
    if not getattr(strategy, "balance", False) or trainer._epoch_state is None:
        return None
    since = max((c["round"] for c in trainer.changes), default=0)
    speed = measured_speeds(trainer._epoch_state.log, since)
    n = len(trainer.shards)
    if sorted(speed) != list(range(n)):
        return None
    speeds, batch, k = [speed[i] for i in range(n)], trainer.replica_batch, strategy.round_steps()
    current = trainer.replica_steps or [k] * n
    times = [c * b / v for c, b, v in zip(current, batch, speeds)]
    if max(times) <= (1 + SPREAD) * min(times):
        return None
    steps = local_steps(speeds, batch, k)
    if steps == list(current):
        return None
    reshard.reshard_to(trainer, [s * b for s, b in zip(steps, batch)], steps)
    change = {"epoch": trainer.epoch, "steps": steps, "rows": list(trainer.shard_sizes)}
    logger.info("daskdist run %s: replicas balanced before epoch %d: local steps %s, shard "
                "rows %s (speeds %s samples/s)", trainer.run_id, trainer.epoch + 1, steps,
                change["rows"], [round(v) for v in speeds])
    return change
