"""Compressed ``hierarchical``: one packed delta per group, applied by every replica.

Within a group (the replicas on one host, by default) each replica's change
to the parameters over the round (its *delta*) travels at full precision to
the group's first worker, which averages the group's deltas by samples and
packs the mean once (:mod:`daskdist.compression`; ``topk``'s error-feedback
memory is the group's, on that worker). Each replica then fetches every
group's packed delta and applies their sample-weighted mean to the state it
holds, as compressed ``local_sgd`` does with the replicas' deltas
(:mod:`daskdist.worker.delta_tasks`); each group's worker gathers the
groups' packed deltas once, and its group's other workers read them there.
So what crosses between groups is one packed delta per group for each other
group, and no full-size state is broadcast (except the epoch's starting
state, which every worker fetches once). Buffers are averaged
uncompressed; optimizer state stays on each replica.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from ..compression import pack
from ..plan import RoundPlan
from ..state import TrainingState, tree_nbytes, tree_weighted_sum
from .aggregation import WeightedSum, combine
from .batchnorm import with_buffers
from .delta_tasks import DeltaResult, apply_mean_delta
from .own_state import group_owner, keep_part, part_for, replica_owner
from .replica import local_steps
from .runtime import GLOBAL, keep

__all__ = ["GroupDelta", "bundle", "finish_group_deltas", "group_delta", "member_round", "relay"]


@dataclass
class GroupDelta:
    """A group's packed mean delta (``payload``) and its members' round statistics."""

    stats: WeightedSum
    payload: dict | None

    @property
    def nbytes(self) -> int:
        """Bytes of array data that a replica fetches."""
        return tree_nbytes(self.payload)


def _apply_groups(own: DeltaResult, groups, replica: int, replica_workers) -> TrainingState:
    """Apply the sample-weighted mean of the groups' deltas to this replica's own state."""
    total = combine(*[g.stats for g in groups], payload=False)
    # the members' deltas sent to their group's worker; every group's packed delta fetched
    # once by every other group's worker; the bundle of them read from there by the others
    leaders = {g.stats.worker for g in groups}
    total.bytes_moved = (sum(g.stats.bytes_moved for g in groups)
                         + sum(g.nbytes for w in leaders for g in groups if g.stats.worker != w)
                         + sum(g.nbytes for w in set(replica_workers) - leaders for g in groups))
    return apply_mean_delta(own, [(g.stats.weight, g.payload) for g in groups], total, replica,
                            replica_workers)


def relay(state):
    """The ``daskdist-relay`` task: a copy of the round's state on a group's first worker."""
    return state


def bundle(*groups: GroupDelta) -> tuple:
    """The ``daskdist-relay`` task: every group's delta, gathered on one group's worker."""
    return groups


def member_round(spec, shard, own, groups: tuple, *, plan: RoundPlan,
                 replica_workers) -> DeltaResult:
    """One compressed ``hierarchical`` round on a replica.

    ``own`` is the epoch's starting :class:`TrainingState`, or this replica's
    :class:`~daskdist.worker.delta_tasks.DeltaResult` of the previous
    round, to which the replica first applies the mean of ``groups`` (the
    previous round's :class:`GroupDelta` of every group, gathered on its
    group's worker). Then it runs ``plan.n_steps`` local steps and returns the
    change they made, unpacked.
    """
    start = isinstance(own, TrainingState)
    state = own if start else _apply_groups(own, groups, plan.replica, replica_workers)
    owner = replica_owner(plan.replica)
    part = part_for(plan.run_id, owner, plan.round, state if start else None)
    if start and part.get("optimizer") is not None:  # the replica's own optimizer state
        state = replace(state, optimizer=part["optimizer"])
    contribution = local_steps(spec, shard, state, plan, part)
    optimizer = None
    if contribution.weight and not contribution.non_finite:
        after = contribution.payload
        optimizer = part["optimizer"] = after["optimizer"]
        contribution.payload = {"delta": after["params"] - state.params,
                                **with_buffers(after)}
    keep_part(plan.run_id, owner, plan.round, part)
    return keep(plan.run_id, plan.replica, state.round,
                DeltaResult(state, optimizer, contribution, state.round, plan,
                            state.nbytes if start else 0))


def group_delta(*members: DeltaResult, group: int, plan: RoundPlan,
                start: TrainingState | None = None) -> GroupDelta:
    """Average a group's deltas by samples and pack the mean (on the group's first worker).

    ``topk``'s error-feedback memory is the group's own part
    (:mod:`daskdist.worker.own_state`), from ``start`` (the epoch's starting
    state, given in its first round) or kept on this worker.
    """
    contributions = [m.contribution for m in members]
    stats = combine(*contributions, payload=False)  # counts the deltas fetched from peers
    live = [c for c in contributions if c.weight]
    owner = group_owner(group)
    part = part_for(plan.run_id, owner, plan.round, start)
    if not stats.weight:
        keep_part(plan.run_id, owner, plan.round, part)  # nothing sent: the memory stays
        return GroupDelta(stats, None)
    weights = [c.weight / stats.weight for c in live]
    mean = np.zeros_like(live[0].payload["delta"])
    for c, w in zip(live, weights):
        mean += np.float32(w) * c.payload["delta"]
    memory = part.get("residual")
    packed, part["residual"] = pack(mean, plan.compression, density=plan.density,
                                    residual=memory if memory is not None
                                    and memory.size == mean.size else None)
    keep_part(plan.run_id, owner, plan.round, part)
    sums = {key: tree_weighted_sum([c.payload[key] for c in live], weights)
            for key in ("buffers", "moments") if all(key in c.payload for c in live)}
    return GroupDelta(stats, {"delta": packed, **sums})


def finish_group_deltas(spec, own: DeltaResult, *groups, plan: RoundPlan,
                        replica_workers) -> TrainingState:
    """Apply an epoch's last round on replica ``plan.replica``: the epoch's final state.

    The ``daskdist-average`` task that ends a compressed ``hierarchical`` epoch.
    """
    final = _apply_groups(own, groups, plan.replica, replica_workers)
    return keep(plan.run_id, GLOBAL, final.round, final)
