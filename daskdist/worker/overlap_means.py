"""The mean an overlapped round folds in, and the fold itself.

Under ``strategy__overlap=True`` (:mod:`daskdist.worker.overlap_tasks`) each
replica forms the sample-weighted mean of a round's packed deltas itself, at
the start of the round that folds it in, and steps its copy of the anchor
with it (:func:`fold`). Under ``local_sgd`` and ``diloco`` it fetches every
replica's delta (:func:`round_mean`). Under ``hierarchical`` each group's
first worker sums its group's deltas (:func:`group_sum`, a
``daskdist-average`` task) and every replica fetches the groups' sums
(:func:`groups_mean`): between groups one sum travels per fetching worker
instead of one delta per replica. The two means are equal up to the order
of float additions.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from ..compression import unpacked
from ..dashboard.events import emit_from_worker, round_event
from ..plan import RoundPlan
from ..state import TrainingState, tree_nbytes, tree_weighted_sum
from .aggregation import WeightedSum, combine, count_skipped, exchange_bytes, log_round
from .batchnorm import pooled
from .runtime import worker_address

__all__ = ["RoundMean", "GroupSum", "round_mean", "group_sum", "groups_mean", "fold"]


@dataclass
class RoundMean:
    """The sample-weighted mean of one round's packed deltas, and the round's statistics.

    ``delta`` is None when no replica trained (every weight zero); it covers
    ``bounds`` of the parameter vector (None: all of it).
    """

    total: WeightedSum
    delta: np.ndarray | None
    buffers: dict | None
    plan: RoundPlan
    sync_s: float
    start_nbytes: int
    bounds: tuple | None = None

    def __sizeof__(self) -> int:
        size = 0 if self.delta is None else self.delta.nbytes
        return object.__sizeof__(self) + size + tree_nbytes(self.buffers)


def round_mean(results, replica_workers) -> RoundMean:
    """The sample-weighted mean of every replica's packed delta of a round (``results``)."""
    contributions = [r.contribution for r in results]
    total = combine(*contributions, payload=False)
    # every worker fetches every other replica's packed delta
    total.bytes_moved = exchange_bytes(results, replica_workers)
    live = [c for c in contributions if c.weight]
    delta = buffers = None
    if live:
        delta = np.zeros_like(unpacked(live[0].payload["delta"]), dtype=np.float32)
        for c in live:
            delta += np.float32(c.weight / total.weight) * unpacked(c.payload["delta"])
        shares = [c.weight / total.weight for c in live]
        buffers = tree_weighted_sum([c.payload["buffers"] for c in live], shares)
        if all("moments" in c.payload for c in live):  # BatchNorm: pooled variances
            buffers = pooled(buffers, tree_weighted_sum([c.payload["moments"] for c in live],
                                                        shares))
    sync_s = _sync_s(contributions)
    bounds = next((r.bounds for r in results if r.contribution.weight), None)
    return RoundMean(total, delta, buffers, results[0].plan,
                     float("nan") if sync_s is None else sync_s,
                     max(r.start_nbytes for r in results), bounds)

@dataclass
class GroupSum:
    """One group's sample-weighted sum of a round's deltas (``hierarchical``, overlapped).

    ``total`` holds the round's statistics of the group's replicas (no
    payload); ``delta`` is ``sum_i w_i unpack(s_i)`` in float32 (None when no
    replica of the group trained), ``buffers`` and ``moments`` the
    sample-weighted sums of the replicas' buffers and batch-norm moments;
    ``worker``: where the sum was formed.
    """

    total: WeightedSum
    delta: np.ndarray | None
    buffers: dict | None
    moments: dict | None
    plan: RoundPlan
    sync_s: float | None
    start_nbytes: int
    bounds: tuple | None
    worker: str | None

    @property
    def nbytes(self) -> int:
        """Bytes of array data that a replica of another group fetches."""
        size = 0 if self.delta is None else self.delta.nbytes
        return size + tree_nbytes(self.buffers) + tree_nbytes(self.moments)

    def __sizeof__(self) -> int:
        return object.__sizeof__(self) + self.nbytes


def _sync_s(contributions) -> float | None:
    return max((c.sync_s for c in contributions if c.sync_s is not None), default=None)


def group_sum(*results) -> GroupSum:
    """The sample-weighted sum of one group's results of a round (its ``daskdist-average`` task).

    ``results`` are the group's replicas' outputs of the round
    (:class:`~daskdist.worker.overlap_tasks.OverlapResult`); the bytes of
    those fetched from other workers are counted in ``total.bytes_moved``.
    """
    contributions = [r.contribution for r in results]
    total = combine(*contributions, payload=False)
    live = [c for c in contributions if c.weight]
    delta = buffers = moments = None
    if live:
        delta = np.zeros_like(unpacked(live[0].payload["delta"]), dtype=np.float32)
        for c in live:
            delta += np.float32(c.weight) * unpacked(c.payload["delta"])
        weights = [c.weight for c in live]
        buffers = tree_weighted_sum([c.payload["buffers"] for c in live], weights)
        if all("moments" in c.payload for c in live):
            moments = tree_weighted_sum([c.payload["moments"] for c in live], weights)
    bounds = next((r.bounds for r in results if r.contribution.weight), None)
    return GroupSum(total, delta, buffers, moments, results[0].plan, _sync_s(contributions),
                    max(r.start_nbytes for r in results), bounds, worker_address())


def groups_mean(sums, replica_workers) -> RoundMean:
    """The sample-weighted mean of a round's deltas from every group's :class:`GroupSum`.

    Equal to :func:`round_mean` of the round's results up to the order of
    float additions. Bytes moved: those each group's sum fetched within its
    group, and each replica's fetch of the sums formed on other workers.
    """
    total = combine(*[s.total for s in sums], payload=False)
    total.bytes_moved += sum(s.nbytes for w in replica_workers for s in sums if s.worker != w)
    live = [s for s in sums if s.delta is not None]
    delta = buffers = None
    if live:
        delta = live[0].delta.copy()
        for s in live[1:]:
            delta += s.delta
        delta /= np.float32(total.weight)
        shares = [1.0 / total.weight] * len(live)
        buffers = tree_weighted_sum([s.buffers for s in live], shares)
        if all(s.moments is not None for s in live):
            buffers = pooled(buffers, tree_weighted_sum([s.moments for s in live], shares))
    sync = [s.sync_s for s in sums if s.sync_s is not None]
    first = min(sums, key=lambda s: s.plan.replica)
    return RoundMean(total, delta, buffers, first.plan, max(sync) if sync else float("nan"),
                     max(s.start_nbytes for s in sums),
                     next((s.bounds for s in live), None))


def fold(anchor: TrainingState, mean: RoundMean, replica_workers, *, emit: bool
         ) -> TrainingState:
    """The anchor after one round's mean: ``g + mean`` (or ``diloco``'s outer step).

    Counts the round's non-finite updates and logs the round (``emit``: also
    tell the scheduler, from one replica only).
    """
    total, plan = mean.total, mean.plan
    counters = dict(round=anchor.round + 1, epoch=plan.epochs_completed(),
                    skipped=count_skipped(anchor, total, plan))
    if mean.delta is None:  # no replica trained (shards exhausted, or no finite update)
        new = replace(anchor, own={}, **counters)
    else:
        lo, hi = mean.bounds or (0, anchor.params.size)
        params, outer = anchor.params.copy(), anchor.outer
        if plan.outer is None:
            params[lo:hi] += mean.delta
        else:  # diloco: the mean change is the outer step's gradient (on its fragment)
            momentum = outer.get("momentum")
            part = {} if momentum is None else {"momentum": momentum[lo:hi]}
            params[lo:hi], part = plan.outer.step(anchor.params[lo:hi], mean.delta, part)
            if part:
                momentum = np.zeros_like(params) if momentum is None else momentum.copy()
                momentum[lo:hi] = part["momentum"]
                outer = {"momentum": momentum}
        new = TrainingState(params=params, buffers=mean.buffers, optimizer=anchor.optimizer,
                            step=anchor.step + total.steps, log=anchor.log, outer=outer,
                            **counters)
    log = log_round(anchor.log, total, plan, mean.start_nbytes, replica_workers, emit=False)
    log = log[:-1] + ({**log[-1], "sync_s": mean.sync_s},)
    if emit:
        emit_from_worker(round_event(plan.run_id, log[-1]))
    return replace(new, log=log)
