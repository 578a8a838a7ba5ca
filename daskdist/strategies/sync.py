"""``sync``: synchronous gradient averaging, one round per optimizer step."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from ..compression import check_compression, unpacked
from ..state import (
    TrainingState,
    load_buffers,
    mean_flat_into,
    module_to_state,
    tree_nbytes,
    tree_weighted_sum,
)
from ..worker.aggregation import combine, count_skipped, exchange_bytes, log_round
from ..worker.replica import Contribution, StateLost, _replica, gradient
from .base import Strategy
from .deadline import DeadlineOption
from .parameter_server import next_version

__all__ = ["Sync", "StepResult", "apply_gradients", "sync_step", "finish_steps"]


@dataclass
class StepResult:
    """A replica's output of one step: the state it computed at, and its gradient.

    The state stays on the worker that computed it: every replica's worker
    already holds the same state, so a copy of a step result that leaves its
    worker (fetched by a peer or the client, or spilled to disk) carries the
    gradient and the state's round counter only. Peers need the gradient
    alone, which halves what a step moves. ``start_nbytes``: the bytes of the
    epoch's starting state when the step began from it (every other worker
    fetched it), else 0.
    """

    state: TrainingState | None
    contribution: Contribution
    round: int
    start_nbytes: int = 0

    def __reduce__(self):
        return (StepResult, (None, self.contribution, self.round, self.start_nbytes))

    @property
    def nbytes(self) -> int:
        """Bytes of array data that a peer fetches."""
        return tree_nbytes(self.contribution.payload)

    def __sizeof__(self) -> int:
        state = 0 if self.state is None else self.state.nbytes
        return object.__sizeof__(self) + state + self.nbytes


def _own_state(spec, own: StepResult, plan) -> TrainingState:
    """This replica's state from its last step result, or from the worker's replica cache."""
    if own.state is not None:
        return own.state
    cached = _replica(spec, plan.run_id, plan.replica).state
    if cached is not None and cached.round == own.round:
        return cached  # the result was spilled to disk and read back on its worker
    raise StateLost(
        f"The training state of replica {plan.replica} at round {own.round} is not on this "
        "worker (its worker was lost)."
    )


def _step(rep, contributions, weight: float, lr) -> None:
    """One optimizer step of the replica's module with the contributions' mean gradient."""
    live = [c for c in contributions if c.weight]
    weights = [c.weight / weight for c in live]
    rep.set_lr(lr)
    params = list(rep.module.parameters())
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    with torch.no_grad():
        # the sample-weighted mean gradient, written straight into .grad
        mean_flat_into([p.grad for p in params],
                       [unpacked(c.payload["grad"]) for c in live], weights)
    rep.optimizer.step()
    load_buffers(rep.module, tree_weighted_sum([c.payload["buffers"] for c in live], weights))


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
    rep = _replica(spec, plan.run_id, plan.replica)
    rep.load(state)
    if total.weight:
        _step(rep, contributions, total.weight, plan.lr)
        stepped = module_to_state(rep.module, rep.optimizer)
        tree = {"params": stepped.params, "buffers": stepped.buffers,
                "optimizer": stepped.optimizer}
    else:
        tree = {"params": state.params, "buffers": state.buffers, "optimizer": state.optimizer}
    new = next_version(state, contributions, total, tree, skipped, record=record,
                       cursors=cursors, transfers=transfers)
    rep.adopt(new)
    return new


def _apply(spec, previous, plan, replica_workers) -> TrainingState:
    """Apply the averaged gradients of the previous step to its state."""
    own = previous[plan.replica]
    state = _own_state(spec, own, plan)
    contributions = [r.contribution for r in previous]
    total = combine(*contributions, payload=False)
    # every replica fetches every other replica's gradient from another worker
    total.bytes_moved = exchange_bytes(previous, replica_workers)
    step_plan = replace(plan, round=plan.round - 1, first_step=plan.first_step - 1)
    skipped = count_skipped(state, total, step_plan)
    rep = _replica(spec, plan.run_id, plan.replica)
    rep.load(state)
    if total.weight:
        _step(rep, contributions, total.weight, plan.lr)
        new = module_to_state(rep.module, rep.optimizer, step=state.step + 1,
                              round=state.round + 1, epoch=step_plan.epochs_completed(),
                              skipped=skipped,
                              log=state.log)
    else:  # no replica contributed a finite gradient: no step
        new = replace(state, round=state.round + 1, epoch=step_plan.epochs_completed(),
                      skipped=skipped)
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
    return StepResult(state, gradient(spec, shard, state, plan), state.round,
                      state.nbytes if start else 0)


def finish_steps(spec, *previous, plan, replica_workers) -> TrainingState:
    """Apply the last step of an epoch and return the epoch's final state.

    The ``daskdist-average`` task that ends a ``sync`` epoch.
    """
    return _apply(spec, previous, plan, replica_workers)


class Sync(DeadlineOption, Strategy):
    """Synchronous data parallelism: every step, average gradients, then step.

    Each replica computes the gradient of its slice of the global batch; the
    gradients are averaged (weighted by slice size) and one optimizer step is
    taken, so every replica continues from the same parameters. This is the
    data-parallel algorithm whose result equals single-process SGD on the
    combined batch.

    Each replica applies the averaged gradient itself at the start of its next
    round (all replicas take the identical step), so a step costs one task per
    replica and one hop through the scheduler; each round's output carries the
    state it started from, so the latest state is held on every replica's
    worker. (Synchronous data-parallel SGD as in Goyal et al. 2017, "Accurate,
    Large Minibatch SGD".)

    What crosses the network is every replica's gradient, fetched by its
    peers; ``compression`` packs it before it leaves the worker
    (:mod:`daskdist.compression`): ``"fp16"`` and ``"bf16"`` halve it,
    ``"topk"`` sends the ``density`` share of largest entries and keeps the
    rest in the replica's error-feedback memory for later steps. Every replica
    still takes the same (decompressed, averaged) step.

    With ``deadline``, a step closes without the replicas whose gradients are
    late by more than ``deadline`` times the running median of round
    durations; a late gradient is averaged into a later step, never lost
    (:mod:`daskdist.strategies.deadline`). The driver then applies each step
    in a ``daskdist-apply`` task, and replicas fetch the new state from it;
    with ``compression`` too, the gradients they send are packed as without
    a deadline.

    Parameters
    ----------
    compression : {None, "fp16", "bf16", "topk"}
        How gradients are packed for the exchange (None: float32 as it is).
    density : float
        Share of gradient entries ``"topk"`` sends per step.
    deadline : float or None
        Close a step once it has run this many times the running median of
        round durations (None: every step waits for every replica).
    """

    name = "sync"
    deadline_tasks = (gradient, apply_gradients)

    def __init__(self, compression: str | None = None, density: float = 0.01,
                 deadline: float | None = None):
        self.compression = compression
        self.density = density
        self.deadline = deadline
        self.validate()

    def validate(self) -> None:
        check_compression(self.compression, self.density)
        self.check_deadline()

    def round_sizes(self, steps_per_epoch: int) -> list[int]:
        return [1] * steps_per_epoch

    def submit_round(self, trainer, state, plans):
        return self.submit_exchange(trainer, sync_step, state, plans)

    def tracked(self, round_output):
        return round_output[0]

    def state_round(self, plan_round: int) -> int:
        # a step result carries the state its step started from
        return plan_round

    def finish_epoch(self, trainer, round_output, plans):
        last = plans[0]
        plan = replace(last, round=last.round + 1, first_step=last.first_step + 1)
        return trainer.submit(
            finish_steps, trainer.spec_future, *round_output, plan=plan,
            replica_workers=trainer.replica_workers,
            key=trainer.task_key("average", last.round, epoch=last.epoch),
            worker=trainer.replica_workers[0])
