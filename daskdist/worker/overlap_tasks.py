"""Overlapped ``local_sgd`` and ``diloco``: a round's average is folded in one round late.

Without overlap, every replica waits at the end of round ``r`` until the
replicas' deltas of round ``r`` are exchanged and averaged. With
``strategy__overlap=True`` it goes on at once from its own parameters, and
the average of round ``r`` is folded in at the start of round ``r + 2``:
the exchange of round ``r`` runs while round ``r + 1`` computes. This is the
delayed averaging of CoCoD-SGD (Shen et al. 2019, "Faster Distributed Deep
Net Training: Computation and Communication Decoupled Stochastic Gradient
Descent", arXiv 1906.12043) and Overlap-Local-SGD (Wang et al. 2020,
arXiv 2002.09539, without its pull coefficient), written on parameter
deltas so that they can be packed (fp16, bf16, top-k with error feedback)
and so that ``diloco``'s outer step applies to them.

The maths. Replica ``i`` starts round ``r`` from ``p_i^r``, ends it at
``q_i^r`` and sends ``s_i^r = pack(q_i^r - p_i^r)`` (``pack``: the identity
uncompressed). Every replica holds the same *anchor* ``g``, the global
state, which folds in one round's mean at a time::

    g^{r+1} = g^r + sum_i w_i s_i^r / sum_i w_i           (local_sgd)
    g^{r+1} = outer_step(g^r, sum_i w_i s_i^r / sum_i w_i) (diloco)

with ``w_i`` the samples replica ``i`` trained on in the round. A round
starts from::

    p_i^r = q_i^{r-1} - s_i^{r-2} + (g^{r-1} - g^{r-2})

the replica's own parameters, less what it sent two rounds ago, plus what
the anchor gained from that round's mean. In an epoch's first round
``p_i = g`` (the epoch's starting state); in its second, ``p_i = q_i`` (no
mean has arrived yet). Uncompressed this is CoCoD-SGD's update: ``p_i^r``
is the mean of the replicas' round ``r - 2`` starting points plus the
replica's own round ``r - 1`` change. The epoch ends with every pending
mean folded in: the final state is the anchor after the last round, the
same kind of state a non-overlapped epoch ends with, so checkpoints and
the next epoch carry no pending average.

Under ``hierarchical`` the mean is folded in two rounds late instead: a
group's sum of its replicas' deltas is a task on the group's first worker
(:func:`~daskdist.worker.overlap_means.group_sum`), which runs between two
of that worker's rounds, so round ``r``'s mean is ready behind round
``r + 2``, not ``r + 1``. The anchor is the same; a round starts from::

    p_i^r = q_i^{r-1} - s_i^{r-3} + (g^{r-2} - g^{r-3})

(in an epoch's first three rounds from ``g``, then ``q_i^0``, then
``q_i^1``); the epoch ends with its last three rounds' means folded in.

Streaming ``diloco`` (``fragments=K``, :mod:`daskdist.worker.fragments`)
exchanges one fragment ``f`` of the parameters a round: the replica sends
``s_i^r = pack((q_i^r - s_i^{r-1} - g)[f])``, the fragment's change since
it was last folded in (what a packed exchange left out stays in the
replica's parameters and goes with the fragment's next exchange), and the
fold steps fragment ``f`` of the anchor (with its slice of the outer
momentum); the rule above is otherwise the same.

Optimizer state (momentum, Adam moments), fp16 loss scalers and ``topk``
residuals stay on each replica (:mod:`daskdist.worker.own_state`), as under
compressed ``local_sgd``. Batch-norm statistics are not corrected one
round late: each replica keeps its own through the epoch, and the anchor
(so the epoch's final state) holds their sample-weighted (pooled) mean of
the last round folded in.

The tasks: each round is one :func:`overlap_round` per replica, and
:func:`finish_overlap` folds an epoch's last two rounds into its final
state. Dask sends a task to a worker only once every input it knows of
exists, so round ``r``'s inputs *in Dask* are every replica's results of
round ``r - 2``: the worker fetches them while it computes round
``r - 1``, and round ``r`` waits in its queue behind it. The replica's own
result of round ``r - 1`` is read from the worker's state store
(:func:`daskdist.worker.runtime.await_kept`), where that round keeps it:
no trip through the scheduler lies between two rounds.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field, replace

import numpy as np

from ..compression import unpacked
from ..errors import StateLost
from ..plan import RoundPlan
from ..state import TrainingState, tree_nbytes
from .batchnorm import with_buffers
from .fragments import exchanged_bounds
from .overlap_means import GroupSum, fold, groups_mean, round_mean
from .own_state import keep_part, part_for, replica_owner
from .replica import Contribution, local_steps, pack_update
from .runtime import GLOBAL, await_kept, keep, kept

__all__ = ["OverlapResult", "finish_overlap", "overlap_round"]


@dataclass
class OverlapResult:
    """A replica's output of one overlapped round.

    ``contribution`` (the packed delta ``s_i^r`` and the replica's buffers)
    is what peers fetch. The rest stays on the worker that made it, as for
    :class:`~daskdist.worker.delta_tasks.DeltaResult` (a copy finds its
    original by ``token``): ``anchor``, the anchor ``g`` the round started
    from (every mean up to round ``r - 2`` folded in; ``r - 3`` two rounds
    late); ``params``, ``q_i^r - s_i^{r-1}`` (two rounds late: ``q_i^r``);
    the replica's own ``buffers`` and ``optimizer``
    state after the round. ``finished``: when the task ended (wall clock),
    for the visible synchronisation time of the next round; ``key``: the
    task's key, by which the next round finds it; ``bounds``: the part of
    the parameter vector the delta covers (None: all of it; a fragment
    under streaming ``diloco``).
    """

    anchor: TrainingState | None
    params: np.ndarray | None
    buffers: dict | None
    optimizer: dict | None
    contribution: Contribution
    round: int
    plan: RoundPlan
    finished: float
    start_nbytes: int = 0
    key: object = None
    bounds: tuple | None = None
    token: str = field(default_factory=lambda: uuid.uuid4().hex)

    def __reduce__(self):
        return (OverlapResult, (None, None, None, None, self.contribution, self.round,
                                self.plan, self.finished, self.start_nbytes, self.key,
                                self.bounds, self.token))

    @property
    def nbytes(self) -> int:
        """Bytes of array data that a peer fetches."""
        return tree_nbytes(self.contribution.payload)

    def __sizeof__(self) -> int:
        held = 0 if self.anchor is None else (self.anchor.nbytes + self.params.nbytes
                                              + tree_nbytes(self.optimizer))
        return object.__sizeof__(self) + held + self.nbytes


def _original(result: OverlapResult) -> OverlapResult:
    """``result`` with what stays on its worker: itself, or the original a copy was made of."""
    if result.anchor is not None:
        return result
    found = kept(result.plan.run_id, result.plan.replica, result.round)
    if isinstance(found, OverlapResult) and found.token == result.token:
        return found
    raise StateLost(
        f"The state of replica {result.plan.replica} at round {result.round} is not on this "
        "worker (its worker was lost).")


def _less(params: np.ndarray, sent, bounds) -> np.ndarray:
    """A copy of ``params`` less what was sent (``sent``, packed, covering ``bounds``)."""
    out = params.copy()
    if sent is not None:
        lo, hi = bounds or (0, out.size)
        out[lo:hi] -= unpacked(sent)
    return out


def _previous(plan: RoundPlan, after: str) -> OverlapResult:
    """This replica's result of the previous round, kept on this worker by task ``after``."""
    key = (after, plan.round - 1, plan.replica)
    found = await_kept(plan.run_id, plan.replica, plan.round - 1, key,
                       lambda v: isinstance(v, OverlapResult) and v.key == key)
    if found is None:
        raise StateLost(
            f"The state of replica {plan.replica} after round {plan.round - 1} is not on this "
            "worker (its worker was lost, or the replica moved).")
    return found


def overlap_round(spec, shard, *inputs, plan: RoundPlan, replica_workers,
                  after: str | None = None, late: int = 1) -> OverlapResult:
    """One overlapped round on a replica (the ``daskdist-round`` task).

    ``inputs`` are the epoch's starting :class:`TrainingState` (in its
    first ``late + 1`` rounds), or what forms the mean of the round
    ``late + 1`` rounds back, which is folded in: every replica's result of
    that round, or (``hierarchical``, ``late=2``) the replica's own result
    of it followed by every group's
    :class:`~daskdist.worker.overlap_means.GroupSum`. Except in the epoch's
    first round, the replica starts from its own result of the previous
    round, read where task ``(after, round - 1, replica)`` keeps it on this
    worker. Corrects the replica's own parameters by what the anchor
    gained less what the replica had sent in the folded round, runs
    ``plan.n_steps`` local steps and packs the change they made.
    """
    from distributed import get_worker

    t_begin = time.time()
    owner = replica_owner(plan.replica)
    previous, mean, sent_bounds, folded_own = inputs[0], None, None, None
    if after is not None:
        previous = _previous(plan, after)
        if isinstance(inputs[-1], GroupSum):  # own result of the folded round, groups' sums
            folded_own = inputs[0]
            mean = groups_mean(inputs[1:], replica_workers)
        elif not isinstance(inputs[0], TrainingState):
            mean = round_mean(inputs, replica_workers)
    if isinstance(previous, TrainingState):  # the epoch's first round
        anchor = previous
        keep(plan.run_id, GLOBAL, anchor.round, anchor)  # found again by a recovery
        part = part_for(plan.run_id, owner, plan.round, anchor)
        params, buffers, sent = anchor.params, anchor.buffers, None
        optimizer = part.get("optimizer") or anchor.optimizer
        last_finished, start_nbytes = t_begin, anchor.nbytes
    else:
        prev = _original(previous)
        anchor, params = prev.anchor, prev.params
        if mean is not None:
            anchor = fold(prev.anchor, mean, replica_workers, emit=plan.replica == 0)
            params = params + (anchor.params - prev.anchor.params)
        if folded_own is not None:  # two rounds late: what the folded round sent leaves now
            params = _less(params, folded_own.contribution.payload.get("delta"),
                           folded_own.bounds)
        buffers, optimizer = prev.buffers, prev.optimizer
        sent = sent_bounds = None
        if late == 1:  # one round late: what this round sends leaves its parameters at once
            sent, sent_bounds = prev.contribution.payload.get("delta"), prev.bounds
        part = part_for(plan.run_id, owner, plan.round)
        last_finished, start_nbytes = prev.finished, 0
    start = TrainingState(params=params, buffers=buffers, optimizer=optimizer,
                          step=anchor.step, round=plan.round, epoch=plan.epoch)
    contribution = local_steps(spec, shard, start, plan, part)
    bounds = exchanged_bounds(spec, plan)
    if contribution.weight and not contribution.non_finite:
        trained = contribution.payload
        buffers = trained["buffers"]
        optimizer = part["optimizer"] = trained["optimizer"]
        own_params = _less(trained["params"], sent, sent_bounds)
        if plan.fragments == 1:  # the round's own change, with its part's error feedback
            delta = pack_update(trained["params"] - params, plan, part)
        else:  # a fragment's change since it was last folded in (the rest stays in it)
            lo, hi = bounds or (0, own_params.size)
            delta = pack_update(own_params[lo:hi] - anchor.params[lo:hi], plan, {})
        contribution.payload = {"delta": delta, **with_buffers(trained)}
    else:  # the round's steps are dropped: the replica goes on from where it started
        own_params, contribution.payload = _less(params, sent, sent_bounds), {}
        contribution.weight = 0.0
    keep_part(plan.run_id, owner, plan.round, part)
    finished = time.time()
    contribution.sync_s = max(finished - last_finished - contribution.compute_s, 0.0)
    return keep(plan.run_id, plan.replica, plan.round,
                OverlapResult(anchor, own_params, buffers, optimizer, contribution, plan.round,
                              plan, finished, start_nbytes, get_worker().get_current_task(),
                              bounds))


def finish_overlap(spec, *results: OverlapResult, n_replicas: int, replica_workers
                   ) -> TrainingState:
    """The epoch's final state: the anchor with the means of its pending rounds folded in.

    The ``daskdist-average`` task that ends an overlapped epoch, on replica
    0's worker. ``results`` are every replica's results of the last round,
    then of each earlier round whose mean is still pending (one round
    under ``local_sgd`` and ``diloco``, two under ``hierarchical``), newest
    first.
    """
    rounds = [results[k:k + n_replicas] for k in range(0, len(results), n_replicas)]
    own = _original(rounds[0][0])
    final = own.anchor
    for pending in reversed(rounds):
        final = fold(final, round_mean(pending, replica_workers), replica_workers, emit=True)
    # replica 0's own optimizer state stands for the replicas' (each keeps its own)
    final = replace(final, optimizer=own.optimizer)
    return keep(own.plan.run_id, GLOBAL, final.round, final)
