"""The worker side of ``sync``: each replica computes its gradient, then applies the mean.

A ``sync`` round is one task per replica (:func:`sync_step`): it first applies
the sample-weighted mean of every replica's gradient of the previous step to
the state it holds itself (every replica takes the identical step, so no
separate aggregation task is needed), then computes its gradient on its
slice of this step's batch. The epoch's last step is applied by
:func:`finish_steps`. With a round deadline, the driver applies each step in
an ``apply`` task instead (:func:`apply_gradients`).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field, replace

import torch

from ..compression import unpacked
from ..errors import StateLost
from ..state import (
    TrainingState,
    buffers_to_numpy,
    load_buffers,
    mean_flat_into,
    module_to_state,
    tree_nbytes,
    tree_weighted_sum,
)
from .aggregation import combine, count_skipped, exchange_bytes, log_round
from .batchnorm import combine_step
from .own_state import keep_part, part_for, replica_owner
from .replica import Contribution, gradient, replica_for
from .runtime import GLOBAL, keep, kept, kept_items
from .stepping import clip_gradients, set_hyper
from .update_tasks import next_version

__all__ = ["StepResult", "own_state", "sync_step", "finish_steps", "apply_gradients"]


@dataclass
class StepResult:
    """A replica's output of one step: the state it computed at, and its gradient.

    The state stays on the worker that computed it: every replica's worker
    already holds the same state, so a copy of a step result that leaves its
    worker (fetched by a peer or the client, or spilled to disk) carries the
    gradient, the state's round counter and the result's ``token`` only.
    Peers need the gradient alone, which halves what a step moves. The
    worker also keeps the result (:mod:`daskdist.worker.runtime`), where a
    copy that comes back finds its state by the token. ``start_nbytes``: the
    bytes of the epoch's starting state when the step began from it (every
    other worker fetched it), else 0.
    """

    state: TrainingState | None
    contribution: Contribution
    round: int
    start_nbytes: int = 0
    token: str = field(default_factory=lambda: uuid.uuid4().hex)

    def __reduce__(self):
        return (StepResult, (None, self.contribution, self.round, self.start_nbytes,
                             self.token))

    @property
    def nbytes(self) -> int:
        """Bytes of array data that a peer fetches."""
        return tree_nbytes(self.contribution.payload)

    def __sizeof__(self) -> int:
        state = 0 if self.state is None else self.state.nbytes
        return object.__sizeof__(self) + state + self.nbytes


def own_state(own: StepResult, plan) -> TrainingState:
    """This replica's state from its last step result, or the result this worker keeps.

    Every replica holds the same state after a step, so where Dask ran the
    task away from its replica's worker (a busy worker's queue is shared out),
    the state a peer replica left on this worker at the same round serves.
    """
    if own.state is not None:
        return own.state
    original = kept(plan.run_id, plan.replica, own.round)
    if isinstance(original, StepResult) and original.token == own.token:
        return original.state  # the copy this task got was made from it, on this worker
    for _, peer in kept_items(plan.run_id, own.round):
        if isinstance(peer, StepResult) and peer.state is not None:
            return peer.state
    raise StateLost(
        f"The training state of replica {plan.replica} at round {own.round} is not on this "
        "worker (its worker was lost)."
    )


def _step(rep, contributions, weight: float, plan) -> None:
    """Step ``plan.first_step`` of the replica's module, with the contributions' mean gradient.

    The mean gradient is the global batch's: clipping acts on it, as it would
    in a single process.
    """
    live = [c for c in contributions if c.weight]
    weights = [c.weight / weight for c in live]
    set_hyper(rep.optimizer, plan)
    params = list(rep.module.parameters())
    start = buffers_to_numpy(rep.module)
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    with torch.no_grad():
        # the sample-weighted mean gradient, written straight into .grad
        mean_flat_into([p.grad for p in params],
                       [unpacked(c.payload["grad"]) for c in live], weights)
    clip_gradients(rep.spec, params)
    rep.optimizer.step()
    buffers = [c.payload["buffers"] for c in live]
    if any("bn_rows" in c.payload for c in live):
        load_buffers(rep.module, combine_step(rep.module, start, buffers,
                                              [c.payload.get("bn_rows", {}) for c in live],
                                              weights))
    else:
        load_buffers(rep.module, tree_weighted_sum(buffers, weights))


def apply_gradients(spec, state, *contributions, record: dict, cursors: tuple, transfers: int,
                    plan) -> TrainingState:
    """One optimizer step with the mean gradient of those that made a round's deadline.

    The ``daskdist-apply`` task of ``sync`` with a deadline: ``contributions``
    are gradients of the replicas that arrived in time, and late ones computed
    at older states, averaged weighted by their samples (non-finite ones left
    out and counted against ``plan.max_non_finite``).
    """
    total = combine(*contributions, payload=False)
    skipped = count_skipped(state, total, plan)
    rep = replica_for(spec, plan.run_id, plan.replica)
    rep.load(state)
    if total.weight:
        _step(rep, contributions, total.weight, plan)
        stepped = module_to_state(rep.module, rep.optimizer)
        tree = {"params": stepped.params, "buffers": stepped.buffers,
                "optimizer": stepped.optimizer}
    else:
        tree = {"params": state.params, "buffers": state.buffers, "optimizer": state.optimizer}
    new = next_version(state, contributions, total, tree, skipped, record=record,
                       cursors=cursors, transfers=transfers)  # (kept on this worker)
    rep.adopt(new)
    return new


def _apply(spec, previous, plan, replica_workers) -> TrainingState:
    """Apply the averaged gradients of the previous step to its state."""
    own = previous[plan.replica]
    state = own_state(own, plan)
    contributions = [r.contribution for r in previous]
    total = combine(*contributions, payload=False)
    # every replica fetches every other replica's gradient from another worker
    total.bytes_moved = exchange_bytes(previous, replica_workers)
    step_plan = replace(plan, round=plan.round - 1, first_step=plan.first_step - 1)
    skipped = count_skipped(state, total, step_plan)
    rep = replica_for(spec, plan.run_id, plan.replica)
    rep.load(state)
    if total.weight:
        _step(rep, contributions, total.weight, step_plan)
        new = module_to_state(rep.module, rep.optimizer, step=state.step + 1,
                              round=state.round + 1, epoch=step_plan.epochs_completed(),
                              skipped=skipped,
                              log=state.log)
    else:  # no replica contributed a finite gradient: no step
        new = replace(state, round=state.round + 1, epoch=step_plan.epochs_completed(),
                      skipped=skipped, own={})
    # every replica logs the round (an epoch's first, with the starting state its workers
    # fetched); one of them tells the scheduler
    new = replace(new, log=log_round(state.log, total, step_plan, own.start_nbytes,
                                     replica_workers, emit=plan.replica == 0))
    rep.adopt(new)
    return new


def sync_step(spec, shard, *previous, plan, replica_workers) -> StepResult:
    """One ``sync`` round on a replica: finish the last step, compute this one's gradient.

    ``previous`` is either the epoch's starting :class:`TrainingState` or every
    replica's :class:`StepResult` of the previous step. In the latter case the
    replica first applies the sample-weighted average of those gradients to
    the previous state — every replica takes the same optimizer step, so no
    separate aggregation task is needed — and then computes its gradient on
    its slice of this step's batch.
    """
    start = isinstance(previous[0], TrainingState)
    state = previous[0] if start else _apply(spec, previous, plan, replica_workers)
    # the replica's own part (loss scaler, topk residual): from the starting state, or kept
    # here after the previous step
    owner = replica_owner(plan.replica)
    part = part_for(plan.run_id, owner, plan.round, state if start else None)
    result = StepResult(state, gradient(spec, shard, state, plan, part), state.round,
                        state.nbytes if start else 0)
    keep_part(plan.run_id, owner, plan.round, part)
    return keep(plan.run_id, plan.replica, state.round, result)


def finish_steps(spec, *previous, plan, replica_workers) -> TrainingState:
    """Apply the last step of an epoch and return the epoch's final state.

    The ``daskdist-average`` task that ends a ``sync`` epoch.
    """
    new = _apply(spec, previous, plan, replica_workers)
    return keep(plan.run_id, GLOBAL, new.round, new)
