"""``sync``: synchronous gradient averaging, one round per optimizer step.

The policy; the replicas' tasks are in :mod:`daskdist.worker.sync_tasks`.
"""

from __future__ import annotations

from dataclasses import replace

from ..compression import check_compression
from ..worker.replica import gradient
from ..worker.sync_tasks import apply_gradients, finish_steps, sync_step
from .base import RoundStrategy
from .deadline import DeadlineOption

__all__ = ["Sync"]


class Sync(DeadlineOption, RoundStrategy):
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

    @property
    def replica_copies(self) -> bool:
        # each replica steps its own copy (with a deadline, one apply task steps the state)
        return self.deadline is None

    def validate(self) -> None:
        check_compression(self.compression, self.density)
        self.check_deadline()

    def round_sizes(self, steps_per_epoch: int) -> list[int]:
        return [1] * steps_per_epoch

    def resizes_mid_epoch(self) -> bool:
        # compressed, replicas keep what they did not send yet
        return self.compression is None and self.deadline is None

    def submit_round(self, ctx, state, plans):
        return self.submit_exchange(ctx, sync_step, state, plans)

    def tracked(self, round_output):
        return round_output[0]

    def state_round(self, plan_round: int) -> int:
        # a step result carries the state its step started from
        return plan_round

    def finish_epoch(self, ctx, round_output, plans):
        last = plans[0]
        plan = replace(last, round=last.round + 1, first_step=last.first_step + 1)
        workers = ctx.info.replica_workers
        return ctx.submit(finish_steps, ctx.spec, *round_output, plan=plan,
                          replica_workers=workers, key=ctx.key("average", last.round),
                          worker=workers[0])
