"""Tasks of the strategies that apply each update to a global state as it arrives.

``async``, ``ssp`` and rounds with a deadline: a replica's round
(:func:`local_delta`) returns the change its local steps made, and an
``apply`` task adds one or more such changes to the newest global state
(:func:`apply_update`, :func:`apply_deltas`), giving the next *version*
(:func:`next_version`), which its worker keeps
(:mod:`daskdist.worker.runtime`).
"""

from __future__ import annotations

import time
from dataclasses import replace

from ..dashboard.events import emit_from_worker, round_event
from ..plan import RoundPlan
from ..state import TrainingState, tree_add, tree_diff, tree_nbytes
from .aggregation import combine, count_skipped
from .own_state import keep_part, latest_part, replica_owner
from .replica import local_steps, pack_update
from .runtime import GLOBAL, keep, worker_address

__all__ = ["local_delta", "apply_update", "apply_deltas", "next_version", "close_epoch",
           "progress"]


def local_delta(spec, shard, state: TrainingState, plan: RoundPlan):
    """Run ``plan.n_steps`` local steps; return the change made to the state.

    The ``daskdist-round`` task of parameter-server strategies: a
    :class:`~daskdist.worker.replica.Contribution` whose payload is the new
    parameters, buffers and optimizer state minus the starting ones. With
    ``plan.compression`` the parameters' delta is packed, with the replica's
    error-feedback memory on this worker (buffers and optimizer state travel
    as they are).
    """
    contribution = local_steps(spec, shard, state, plan)
    # one replica's delta at a time: its BatchNorm statistics replace the state's as they are
    contribution.payload.pop("moments", None)
    if contribution.weight and not contribution.non_finite:
        before = {"params": state.params, "buffers": state.buffers,
                  "optimizer": state.optimizer}
        delta = tree_diff(contribution.payload, before)
        if plan.compression:  # arrival order rules here: the newest memory on this worker
            owner = replica_owner(plan.replica)
            part = latest_part(plan.run_id, owner)
            delta["params"] = pack_update(delta["params"], plan, part)
            keep_part(plan.run_id, owner, plan.round, part)
        contribution.payload = delta
    return contribution


def apply_update(state: TrainingState, *contributions, scales, record: dict, cursors: tuple,
                 transfers: int, plan: RoundPlan) -> TrainingState:
    """Add replicas' deltas, each times its scale, to the global state: the next version.

    The ``daskdist-apply`` task: one delta for ``async`` and ``ssp``, the
    deltas that made a round's deadline (and late ones from earlier rounds)
    for a ``local_sgd`` with a deadline. ``scales`` is one factor per delta,
    or None for the sample-weighted mean of the finite ones. ``record`` holds
    what the driver knows of the update (epoch, staleness, rows); the round
    log gets it with the deltas' loss, samples, timings and bytes.
    ``transfers`` is the number of times the update made a copy of the global
    state cross between workers. Non-finite deltas are left out, and counted
    against ``plan.max_non_finite`` (``plan`` names the version and epoch).
    """
    total = combine(*contributions, payload=False)
    skipped = count_skipped(state, total, plan)
    if scales is None:
        scales = [c.weight / total.weight if total.weight else 0.0 for c in contributions]
    tree = {"params": state.params, "buffers": state.buffers, "optimizer": state.optimizer}
    for c, scale in zip(contributions, scales):
        if c.weight and not c.non_finite:
            tree = tree_add(tree, c.payload, scale)
    return next_version(state, contributions, total, tree, skipped, record=record,
                        cursors=cursors, transfers=transfers)


def next_version(state: TrainingState, contributions, total, tree: dict, skipped, *,
                 record: dict, cursors: tuple, transfers: int) -> TrainingState:
    """The global state after an update: ``tree`` and the update's record in the round log."""
    t_end = time.time()
    here = worker_address()
    record = {
        **record,
        "round": state.round,
        "replicas": tuple(c.replica for c in contributions if c.weight),
        "skipped": tuple(c.replica for c in contributions if c.non_finite),
        "samples": int(total.weight),
        "steps": total.steps,
        "loss_sum": total.loss_sum,
        "bytes": int(transfers * state.nbytes
                     + sum(tree_nbytes(c.payload) for c in contributions if c.worker != here)),
        "compute_s": total.compute_s,
        # from the last contribution's arrival to its application
        "sync_s": max(t_end - max(c.t_start + c.compute_s for c in contributions), 0.0),
        "t_start": total.t_start,
        "t_end": t_end,
        "per_replica": tuple((c.replica, c.loss_sum, c.weight, c.compute_s)
                             for c in contributions),
    }
    emit_from_worker(round_event(record["run"], record))
    log = state.log if state.log and state.log[-1]["epoch"] == record["epoch"] else ()
    new = TrainingState(
        params=tree["params"], buffers=tree["buffers"], optimizer=tree["optimizer"],
        step=state.step + total.steps, round=state.round + 1, epoch=state.epoch,
        skipped=skipped, log=log + (record,), cursors=cursors,
    )
    return keep(record["run"], GLOBAL, new.round, new)


def close_epoch(state: TrainingState, epoch: int) -> TrainingState:
    """The ``daskdist-close`` task: the state counts epoch ``epoch`` as completed."""
    return replace(state, epoch=epoch + 1)


def progress(state: TrainingState, epoch: int) -> tuple:
    """What the driver needs of a state to go on: version, cursors, rows done this epoch."""
    rows = sum(r["rows"] for r in state.log if r["epoch"] == epoch)
    return state.round, state.cursors, rows


def apply_deltas(spec, state, *contributions, record: dict, cursors: tuple, transfers: int,
                 plan):
    """Add the sample-weighted mean of a round's deltas to the global state (``local_sgd``).

    The ``daskdist-apply`` task of a round with a deadline; see
    :func:`~daskdist.strategies.parameter_server.apply_update`.
    """
    return apply_update(state, *contributions, scales=None, record=record, cursors=cursors,
                        transfers=transfers, plan=plan)
