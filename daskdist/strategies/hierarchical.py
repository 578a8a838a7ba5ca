"""``hierarchical``: local SGD averaged first within groups of replicas, then across groups."""

from __future__ import annotations

from distributed.comm import get_address_host

from ..worker.aggregation import average_parameters, combine
from ..worker.group_tasks import bundle, finish_group_deltas, group_delta, member_round, relay
from ..worker.own_state import group_owner
from .local_sgd import LocalSGD
from .overlap import finish_overlapped

__all__ = ["Hierarchical", "groups_by_host", "check_groups", "resolve_groups", "relay_sources"]


def groups_by_host(replica_workers: list[str]) -> list[list[int]]:
    """Replica indices grouped by the host of their worker, in order of first appearance."""
    groups: dict[str, list[int]] = {}
    for replica, worker in enumerate(replica_workers):
        groups.setdefault(get_address_host(worker), []).append(replica)
    return list(groups.values())


def check_groups(groups) -> None:
    """Raise ``ValueError`` unless ``groups`` is a list of non-empty lists naming replicas once."""
    flat = [r for group in groups for r in group] if _is_nested(groups) else None
    if not flat or any(not isinstance(r, int) or isinstance(r, bool) for r in flat) \
            or any(not group for group in groups):
        raise ValueError("groups must be a list of non-empty lists of replica indices, "
                         f"got {groups!r}.")
    if len(set(flat)) != len(flat):
        raise ValueError(f"groups must name each replica once, got {groups!r}.")


def resolve_groups(groups, replica_workers: list[str]) -> list[list[int]]:
    """The groups of a fit's replicas: ``groups`` as given, or by host where it is None."""
    if groups is None:
        return groups_by_host(replica_workers)
    named = sorted(r for group in groups for r in group)
    if named != list(range(len(replica_workers))):
        raise ValueError(
            f"groups {groups!r} must name every replica 0..{len(replica_workers) - 1} once.")
    return [list(group) for group in groups]


def relay_sources(replica_workers: list[str], groups, holder: str | None) -> dict:
    """Where each worker reads the round's state: a group leader's worker, or None.

    ``holder`` is the worker that computed the state. The workers of a group
    with a replica on the holder read the holder's copy (None); those of
    another group read a copy on the group's first worker (its leader), so
    that the state crosses once to each group and travels within the group
    from there. A worker with replicas in several groups reads where the
    first of them says (a leader reads its own copy); every worker fetches
    the state at most once.
    """
    leaders = [None if any(replica_workers[r] == holder for r in group)
               else replica_workers[group[0]] for group in groups]
    sources: dict = {}
    for group, leader in zip(groups, leaders):
        for replica in group:
            sources.setdefault(replica_workers[replica], leader)
    sources.update((leader, leader) for leader in leaders if leader is not None)
    return sources


def _submit_relays(ctx, task, args: list, sources: dict, plan) -> dict:
    """Queue ``task(*args)`` on each worker that :func:`relay_sources` names: worker -> output."""
    workers = list(ctx.info.replica_workers)
    return {
        leader: ctx.submit(task, *args, key=ctx.key("relay", plan.round, workers.index(leader)),
                           worker=leader)
        for leader in dict.fromkeys(v for v in sources.values() if v is not None)
    }


class Hierarchical(LocalSGD):
    """Local SGD with two-level aggregation: within each group, then across groups.

    The source document's "local, then global" gradient aggregation, in the
    form of hierarchical (two-level) parameter averaging used for clusters of
    multi-GPU hosts (for example Lin et al. 2018, "Don't Use Large
    Mini-Batches, Use Local SGD", section on hierarchical local SGD). Every
    ``sync_every`` local steps, each group's replicas are summed (weighted by
    their samples) by one task on the group's first worker; one partial sum
    per group then crosses to the root, which averages them, and the new
    state crosses back once to each group's first worker, where the group's
    other workers read it. So between groups — hosts, by default — one
    message per group travels each way per round instead of one per
    replica. The result equals flat averaging
    (:class:`~daskdist.strategies.LocalSGD`) up to the order of float
    additions.

    With ``compression`` (``"fp16"``, ``"bf16"``, or ``"topk"`` with error
    feedback), each group's first worker packs the group's mean parameter
    delta once and gathers the other groups' packed deltas, and every
    replica applies their mean itself
    (:mod:`daskdist.worker.group_tasks`): each group's packed delta
    crosses once to each other group, and optimizer state stays on each
    replica.

    Parameters
    ----------
    sync_every : int
        Local optimizer steps between two averages.
    groups : list of list of int, optional
        Replica indices of each group; every replica in exactly one group.
        Default: the replicas whose workers share a host (from the
        scheduler's worker addresses).
    compression : {None, "fp16", "bf16", "topk"}
        How each group's delta is packed (None: parameters are averaged as
        they are, optimizer state included).
    density : float
        Share of delta entries ``"topk"`` sends per group and round.
    balance : bool
        Local steps and shard sizes that follow each replica's measured
        speed (as for :class:`~daskdist.strategies.LocalSGD`).
    overlap : bool
        Fold each round's average in two rounds late, so that the group
        sums and the exchange run behind compute. A group's sum is a task on
        its first worker, which can run only between two of that worker's
        rounds: folded one round late, as under ``local_sgd``, the next
        round would wait for it. Two rounds late it runs behind the next
        round (the rule is in :mod:`daskdist.worker.overlap_tasks`). Under
        overlap each group's sum crosses to the other groups' replicas as
        float32, whatever ``compression`` packs within the group.
    """

    name = "hierarchical"

    def __init__(self, sync_every: int = 8, groups=None, compression: str | None = None,
                 density: float = 0.01, overlap: bool = False, balance: bool = False):
        self.groups = groups
        super().__init__(sync_every=sync_every, compression=compression, density=density,
                         overlap=overlap, balance=balance)

    def validate(self) -> None:
        super().validate()
        if self.groups is not None:
            check_groups(self.groups)

    def elastic_refusal(self) -> str | None:
        if isinstance(self.groups, (list, tuple)):
            return (f"strategy={self.name!r} was given its groups as lists of replicas; "
                    "groups='host' follows a changed replica count")
        return super().elastic_refusal()

    def check_replicas(self, replica_workers: list[str]) -> None:
        self.resolve_groups(replica_workers)

    def resolve_groups(self, replica_workers: list[str]) -> list[list[int]]:
        """The groups of this fit's replicas (``groups``, or by host)."""
        return resolve_groups(self.groups, replica_workers)

    def overlap_groups(self, replica_workers: list[str]):
        return self.resolve_groups(replica_workers)

    def owners(self, replica_workers: list[str]) -> list[str]:
        owners = super().owners(replica_workers)
        if self.compression is None or self.overlap:
            return owners
        # compressed, each group packs its mean delta with its own error-feedback memory
        return owners + [group_owner(g)
                         for g in range(len(self.resolve_groups(replica_workers)))]

    def submit_round(self, ctx, state, plans):
        if self.overlap:
            return super().submit_round(ctx, state, plans)
        if self.compression is not None:
            return self._submit_compressed(ctx, state, plans)
        workers = list(ctx.info.replica_workers)
        groups = self.resolve_groups(workers)
        round_index = plans[0].round
        # the state comes from the previous round's root: a group elsewhere reads it through
        # a copy on its first worker, so that it crosses to the group once
        leaders = [workers[group[0]] for group in groups]
        sources = relay_sources(workers, groups, leaders[(round_index - 1) % len(leaders)])
        relays = _submit_relays(ctx, relay, [state], sources, plans[0])
        states = [relays.get(sources[workers[p.replica]], state) for p in plans]
        parts = self.submit_replicas(ctx, type(self).replica_task, states, plans)
        partials, leaders = [], []
        for g, members in enumerate(groups):
            leader = workers[members[0]]
            if len(members) == 1:
                partials.append(parts[members[0]])
            else:
                partials.append(ctx.submit(
                    combine, *[parts[i] for i in members],
                    key=ctx.key("average", round_index, 0, g), worker=leader))
            leaders.append(leader)
        root = leaders[round_index % len(leaders)]  # the root's extra work rotates
        return ctx.submit(average_parameters, ctx.spec, state, *partials, plan=plans[0],
                          replica_workers=workers, key=ctx.key("average", round_index),
                          worker=root)


    def _submit_compressed(self, ctx, state, plans):
        """Queue a compressed round: the replicas' rounds, then one packed delta per group.

        Returns the replicas' outputs followed by the groups'; the next round
        takes them as ``state``.
        """
        workers = list(ctx.info.replica_workers)
        groups = self.resolve_groups(workers)
        start = None
        if isinstance(state, list):
            own = state[:len(workers)]
            bundles = self._bundles(ctx, groups, state[len(workers):], plans[0])
        else:  # the epoch's first round: groups' residuals come with the starting state
            own, bundles, start = [state] * len(workers), {}, state
        members = [
            ctx.submit(member_round, ctx.spec, ctx.shards[p.replica], own[p.replica],
                       bundles.get(workers[p.replica], ()), plan=p, replica_workers=workers,
                       key=ctx.key("round", p.round, p.replica), worker=workers[p.replica])
            for p in plans
        ]
        group_outputs = [
            ctx.submit(group_delta, *[members[i] for i in group], group=g,
                       plan=plans[group[0]], start=start,
                       key=ctx.key("average", plans[0].round, 0, g),
                       worker=workers[group[0]])
            for g, group in enumerate(groups)
        ]
        return members + group_outputs

    @staticmethod
    def _bundles(ctx, groups, group_outputs, plan) -> dict:
        """Every group's delta gathered on each group's worker: worker -> its bundle.

        No worker holds every group's delta, so each group's worker gathers
        them and the others read there (:func:`relay_sources`): each packed
        delta crosses once to each group.
        """
        sources = relay_sources(list(ctx.info.replica_workers), groups, None)
        gathered = _submit_relays(ctx, bundle, group_outputs, sources, plan)
        return {worker: gathered[leader] for worker, leader in sources.items()}

    def finish_epoch(self, ctx, round_output, plans):
        if self.overlap:
            return finish_overlapped(ctx, round_output, plans)
        if self.compression is None:
            return round_output
        workers = list(ctx.info.replica_workers)
        last = plans[0]
        return ctx.submit(finish_group_deltas, ctx.spec, round_output[0],
                          *round_output[len(workers):], plan=last, replica_workers=workers,
                          key=ctx.key("average", last.round), worker=workers[0])


def _is_nested(groups) -> bool:
    return isinstance(groups, (list, tuple)) and all(isinstance(g, (list, tuple)) for g in groups)
