"""Averaging on the workers: weighted sums of contributions, and the round log.

The bodies of the ``daskdist-average`` tasks that the driver arranges in a
tree (:mod:`daskdist.driver.tree`): :func:`combine` sums contributions (or
partial sums), :func:`average_parameters` turns a round's sum into the next
:class:`~daskdist.state.TrainingState` for ``local_sgd``. Every average is
weighted by the number of samples behind each contribution; every round is
logged (:func:`log_round`) for the ``rounds_`` table and the dashboard.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

from ..dashboard.events import emit_from_worker, round_event
from ..errors import NonFiniteError
from ..state import TrainingState, tree_nbytes, tree_scale, tree_weighted_sum
from .batchnorm import pooled
from .replica import Contribution
from .runtime import GLOBAL, keep, worker_address

__all__ = ["WeightedSum", "average_parameters", "check_non_finite", "combine", "count_skipped",
           "exchange_bytes", "log_round"]


@dataclass
class WeightedSum:
    """The sample-weighted sum of several contributions.

    ``payload`` is ``sum(weight_i * payload_i)`` (``None`` when every weight is
    zero), ``weight`` the total number of samples; the rest are statistics of
    the round carried to the round log (``skipped``: replicas whose update was
    not finite).
    """

    payload: dict | None
    weight: float
    loss_sum: float
    steps: int
    compute_s: float
    t_start: float
    samples: dict
    bytes_moved: int
    worker: str | None
    skipped: tuple = ()
    per_replica: dict = field(default_factory=dict)

    def mean(self) -> dict | None:
        """The weighted mean of the payloads."""
        if self.payload is None:
            return None
        return tree_scale(self.payload, 1.0 / self.weight)


def _as_sum(part) -> WeightedSum:
    if isinstance(part, WeightedSum):
        return part
    c: Contribution = part
    return WeightedSum(
        payload=None if not c.weight else c.payload, weight=c.weight, loss_sum=c.loss_sum,
        steps=c.steps, compute_s=c.compute_s, t_start=c.t_start,
        samples={c.replica: c.weight}, bytes_moved=0, worker=c.worker,
        skipped=(c.replica,) if c.non_finite else (),
        per_replica={c.replica: (c.loss_sum, c.weight, c.compute_s)},
    )


def combine(*parts, payload: bool = True) -> WeightedSum:
    """Sum contributions (or partial sums) into one :class:`WeightedSum`.

    The body of ``daskdist-average`` tasks; counts the payload bytes that had
    to come from other workers. With ``payload=False`` only the statistics are
    combined (for a caller that averages the payloads itself).
    """
    here = worker_address()
    sums = [_as_sum(p) for p in parts]
    moved = sum(s.bytes_moved for s in sums)
    moved += sum(tree_nbytes(s.payload) for s in sums
                 if s.payload is not None and s.worker != here)
    # A contribution's payload is a mean; a partial sum's payload is a sum.
    trees = [s.payload for s in sums]
    weights = [(s.weight if isinstance(p, Contribution) else 1.0) if s.weight else 0.0
               for s, p in zip(sums, parts)]
    total = tree_weighted_sum(trees, weights) if payload and any(weights) else None
    samples, per_replica = {}, {}
    for s in sums:
        samples.update(s.samples)
        per_replica.update(s.per_replica)
    return WeightedSum(
        payload=total, weight=sum(s.weight for s in sums),
        loss_sum=sum(s.loss_sum for s in sums), steps=max(s.steps for s in sums),
        compute_s=max(s.compute_s for s in sums), t_start=min(s.t_start for s in sums),
        samples=samples, bytes_moved=moved, worker=here,
        skipped=tuple(sorted(r for s in sums for r in s.skipped)),
        per_replica=per_replica,
    )


def exchange_bytes(results, replica_workers) -> int:
    """Bytes moved when every replica fetches every other replica's result.

    ``results`` are the replicas' outputs of a round (each with ``nbytes``,
    what a peer fetches), in replica order; a result on the fetching
    replica's own worker costs nothing.
    """
    return sum(r.nbytes for w in replica_workers
               for r, rw in zip(results, replica_workers) if rw != w)


def log_round(log: tuple, total: WeightedSum, plan, state_nbytes: int, replica_workers, *,
              emit: bool = True) -> tuple:
    """Append the record of a finished round to the epoch's round log.

    The log restarts with the first round of each epoch (see ``rounds_``).
    With ``emit``, the record is also sent to the scheduler as a ``"round"``
    event (:mod:`daskdist.dashboard.events`).
    """
    here = worker_address()
    broadcast = state_nbytes * sum(1 for w in set(replica_workers) if w != here)
    record = {
        "round": plan.round,
        "epoch": plan.epoch,
        "replicas": tuple(sorted(r for r, w in total.samples.items() if w)),
        "skipped": total.skipped,
        "samples": int(total.weight),
        "steps": total.steps,
        "loss_sum": total.loss_sum,
        "bytes": int(total.bytes_moved + broadcast),
        "compute_s": total.compute_s,
        "t_start": total.t_start,
        "t_end": time.time(),
        "per_replica": tuple((r, *stats) for r, stats in sorted(total.per_replica.items())),
    }
    if emit:
        emit_from_worker(round_event(plan.run_id, record))
    return (log if plan.first_step else ()) + (record,)


def count_skipped(state, total: WeightedSum, plan) -> int:
    """The fit's count of skipped (non-finite) updates after this round.

    Raises :class:`~daskdist.worker.replica.NonFiniteError` once it exceeds
    ``plan.max_non_finite``.
    """
    return check_non_finite(state.skipped, total.skipped, plan)


def check_non_finite(skipped_before: int, replicas, plan, count: int | None = None) -> int:
    """Add a round's non-finite ``replicas`` to the fit's count; return the new count.

    Each replica counts as one skipped update (or the round counts ``count``).
    Raises :class:`~daskdist.worker.replica.NonFiniteError` once the count exceeds
    ``plan.max_non_finite`` (``plan`` names the round and epoch).
    """
    skipped = skipped_before + (len(replicas) if count is None else count)
    limit = plan.max_non_finite
    if replicas and limit is not None and skipped > limit:
        raise NonFiniteError(
            f"Replica(s) {list(replicas)} produced a non-finite loss or update in round "
            f"{plan.round} (epoch {plan.epoch}): {skipped} non-finite updates in this fit, more "
            f"than daskdist.driver.max-non-finite={limit}. The parameters are those of the last "
            "finite round; lower the learning rate, clip gradients or check the data."
        )
    return skipped


def average_parameters(spec, state, *parts, plan, replica_workers):
    """Average the replicas' parameters, buffers and optimizer state.

    The root ``daskdist-average`` task of ``local_sgd`` (and of
    ``hierarchical``, given the groups' partial sums); the average is
    weighted by the samples each replica trained on in the round. The new
    state is kept on this worker (:mod:`daskdist.worker.runtime`).
    """
    total = combine(*parts)
    skipped = count_skipped(state, total, plan)
    mean = total.mean()
    if mean is None:  # no replica trained (shards exhausted, or no finite update)
        new = replace(state, round=state.round + 1, epoch=plan.epochs_completed(),
                      skipped=skipped, own={})
    else:
        buffers = mean["buffers"]
        if "moments" in mean:  # BatchNorm: the running variances pooled
            buffers = pooled(buffers, mean["moments"])
        new = TrainingState(
            params=mean["params"], buffers=buffers, optimizer=mean["optimizer"],
            step=state.step + total.steps, round=state.round + 1, epoch=plan.epochs_completed(),
            skipped=skipped, log=state.log,
        )
    new = replace(new, log=log_round(state.log, total, plan, new.nbytes, replica_workers))
    return keep(plan.run_id, GLOBAL, new.round, new)
