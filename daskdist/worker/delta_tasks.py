"""Compressed ``local_sgd``: replicas exchange packed parameter deltas, not parameters.

With compression, what must cross the network is small only if neither the
replicas' new parameters nor the averaged state travel at full size. So each
replica sends the change its round made to the parameters (its *delta*),
packed (:mod:`daskdist.compression`, with error feedback for ``topk``), and
each replica, at the start of its next round, applies the sample-weighted
average of all the deltas to the state it holds itself, as ``sync`` does with
gradients. Every replica computes the same new parameters from the same packed
deltas, so the state never has to be broadcast.

Buffers (batch-norm statistics, small) are averaged uncompressed. Optimizer
state (momentum, Adam moments) stays on each replica: averaging it would send
as many floats again, uncompressed. It is part of what the replica keeps of
its own (:mod:`daskdist.worker.own_state`, with ``topk``'s residual), which
an epoch's final state carries: each replica continues the next epoch, or a
resumed fit, from its own optimizer state, at every round alike.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field, replace

import numpy as np

from ..compression import unpacked
from ..errors import StateLost
from ..plan import RoundPlan
from ..state import TrainingState, tree_nbytes, tree_weighted_sum
from .aggregation import combine, count_skipped, exchange_bytes, log_round
from .batchnorm import pooled, with_buffers
from .own_state import keep_part, part_for, replica_owner
from .replica import Contribution, local_steps, pack_update
from .runtime import GLOBAL, keep, kept

__all__ = ["DeltaResult", "apply_mean_delta", "delta_round", "finish_deltas", "own_result"]


@dataclass
class DeltaResult:
    """A replica's output of one round: its packed delta, and what stays on its worker.

    ``state`` (the state the round started from) and ``optimizer`` (the
    replica's optimizer state after the round) stay on the worker that made
    them: a copy that leaves it (fetched by a peer or the client, or spilled
    to disk) carries the contribution, the round counter, the plan and the
    result's ``token`` only. ``start_nbytes``: the bytes of the epoch's
    starting state when the round began from it (every other worker fetched
    it), else 0.

    The replica's next round needs the state on the same worker, but a copy
    may be what it gets there: Dask's active memory manager drops one of two
    copies of a key (here: the replica's own, and the one a peer fetched)
    from whichever worker holds the most memory, the replica's own worker
    included. So the worker keeps each replica's newest results
    (:mod:`daskdist.worker.runtime`), where a copy finds its original by the
    ``token`` (:func:`own_result`): only the result the copy was made from
    matches, never one of another round, attempt or fit.
    """

    state: TrainingState | None
    optimizer: dict | None
    contribution: Contribution
    round: int
    plan: RoundPlan
    start_nbytes: int = 0
    token: str = field(default_factory=lambda: uuid.uuid4().hex)

    def __reduce__(self):
        return (DeltaResult, (None, None, self.contribution, self.round, self.plan,
                              self.start_nbytes, self.token))

    @property
    def nbytes(self) -> int:
        """Bytes of array data that a peer fetches."""
        return tree_nbytes(self.contribution.payload)

    def __sizeof__(self) -> int:
        held = 0 if self.state is None else self.state.nbytes + tree_nbytes(self.optimizer)
        return object.__sizeof__(self) + held + self.nbytes


def own_result(own: DeltaResult, replica: int) -> DeltaResult:
    """``own`` with its state: itself, or the original this worker keeps of a copy.

    Raises :class:`~daskdist.errors.StateLost` when neither holds it (the
    worker that made it was lost).
    """
    if own.state is not None:
        return own
    original = kept(own.plan.run_id, replica, own.round)
    if isinstance(original, DeltaResult) and original.token == own.token:
        return original
    raise StateLost(
        f"The training state of replica {replica} at round {own.round} is not on this "
        "worker (its worker was lost)."
    )


def _average(previous, replica: int, replica_workers) -> TrainingState:
    """Apply the average of the previous round's deltas to this replica's own state."""
    contributions = [r.contribution for r in previous]
    total = combine(*contributions, payload=False)
    # every replica fetches every other replica's packed delta
    total.bytes_moved = exchange_bytes(previous, replica_workers)
    return apply_mean_delta(previous[replica], [(c.weight, c.payload) for c in contributions],
                            total, replica, replica_workers)


def apply_mean_delta(own: DeltaResult, updates, total, replica: int,
                     replica_workers) -> TrainingState:
    """Add the weighted mean of packed deltas to the state ``own`` started its round from.

    Under ``diloco`` (``plan.outer``) the mean is the outer optimizer's
    pseudo-gradient instead (:mod:`daskdist.worker.outer`).

    ``updates`` are ``(weight, payload)`` pairs, payloads holding a packed
    ``delta`` and ``buffers``; ``total`` is their combined statistics (a
    :class:`~daskdist.worker.aggregation.WeightedSum`), logged as the round. An
    epoch's first round also logs the starting state its workers fetched.
    """
    own = own_result(own, replica)
    state, plan = own.state, own.plan
    skipped = count_skipped(state, total, plan)
    optimizer = own.optimizer if own.optimizer is not None else state.optimizer
    counters = dict(round=state.round + 1, epoch=plan.epochs_completed(), skipped=skipped)
    outer = state.outer
    if total.weight:
        live = [(w, payload) for w, payload in updates if w]
        params = state.params.copy() if plan.outer is None else np.zeros_like(state.params)
        for w, payload in live:
            params += np.float32(w / total.weight) * unpacked(payload["delta"])
        if plan.outer is not None:  # diloco: the mean change is the outer step's gradient
            params, outer = plan.outer.step(state.params, params, state.outer)
        shares = [w / total.weight for w, _ in live]
        buffers = tree_weighted_sum([payload["buffers"] for _, payload in live], shares)
        if all("moments" in payload for _, payload in live):  # BatchNorm: pooled variances
            buffers = pooled(buffers, tree_weighted_sum([p["moments"] for _, p in live],
                                                        shares))
        new = TrainingState(params=params, buffers=buffers, optimizer=optimizer,
                            step=state.step + total.steps, log=state.log, outer=outer,
                            **counters)
    else:  # no replica trained (shards exhausted, or no finite update)
        new = replace(state, optimizer=optimizer, own={}, **counters)
    # every replica logs the round; one of them tells the scheduler
    return replace(new, log=log_round(state.log, total, plan, own.start_nbytes,
                                      replica_workers, emit=replica == 0))


def delta_round(spec, shard, *previous, plan: RoundPlan, replica_workers) -> DeltaResult:
    """One compressed ``local_sgd`` round on a replica.

    ``previous`` is the epoch's starting :class:`TrainingState`, or every
    replica's :class:`DeltaResult` of the previous round, whose average the
    replica applies to its own state first. Then it runs ``plan.n_steps``
    local steps and packs the change they made to the parameters.
    """
    start = isinstance(previous[0], TrainingState)
    state = previous[0] if start else _average(previous, plan.replica, replica_workers)
    owner = replica_owner(plan.replica)
    part = part_for(plan.run_id, owner, plan.round, state if start else None)
    if start and part.get("optimizer") is not None:  # the replica's own optimizer state
        state = replace(state, optimizer=part["optimizer"])
    contribution = local_steps(spec, shard, state, plan, part)
    optimizer = None
    if contribution.weight and not contribution.non_finite:
        after = contribution.payload
        optimizer = part["optimizer"] = after["optimizer"]
        contribution.payload = {"delta": pack_update(after["params"] - state.params, plan, part),
                                **with_buffers(after)}
    keep_part(plan.run_id, owner, plan.round, part)
    return keep(plan.run_id, plan.replica, state.round,
                DeltaResult(state, optimizer, contribution, state.round, plan,
                            state.nbytes if start else 0))


def finish_deltas(spec, *previous, plan: RoundPlan, replica_workers) -> TrainingState:
    """Apply an epoch's last round on replica ``plan.replica``: the epoch's final state.

    The ``daskdist-average`` task that ends a compressed ``local_sgd`` epoch.
    """
    final = _average(previous, plan.replica, replica_workers)
    return keep(plan.run_id, GLOBAL, final.round, final)
