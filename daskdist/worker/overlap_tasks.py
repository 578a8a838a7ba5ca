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
from ..dashboard.events import emit_from_worker, round_event
from ..errors import StateLost
from ..plan import RoundPlan
from ..state import TrainingState, tree_nbytes, tree_weighted_sum
from .aggregation import WeightedSum, combine, count_skipped, exchange_bytes, log_round
from .batchnorm import pooled, with_buffers
from .fragments import exchanged_bounds
from .own_state import keep_part, part_for, replica_owner
from .replica import Contribution, local_steps, pack_update
from .runtime import GLOBAL, await_kept, keep, kept

__all__ = ["OverlapResult", "RoundMean", "finish_overlap", "fold", "round_mean",
           "overlap_round"]


@dataclass
class OverlapResult:
    """A replica's output of one overlapped round.

    ``contribution`` (the packed delta ``s_i^r`` and the replica's buffers)
    is what peers fetch. The rest stays on the worker that made it, as for
    :class:`~daskdist.worker.delta_tasks.DeltaResult` (a copy finds its
    original by ``token``): ``anchor``, the anchor ``g`` the round started
    from (every mean up to round ``r - 2`` folded in); ``params``,
    ``q_i^r - s_i^{r-1}``; the replica's own ``buffers`` and ``optimizer``
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
    sync_s = max((c.sync_s for c in contributions if c.sync_s is not None), default=None)
    bounds = next((r.bounds for r in results if r.contribution.weight), None)
    return RoundMean(total, delta, buffers, results[0].plan,
                     float("nan") if sync_s is None else sync_s,
                     max(r.start_nbytes for r in results), bounds)


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
                  after: str | None = None) -> OverlapResult:
    """One overlapped round on a replica (the ``daskdist-round`` task).

    ``inputs`` are the epoch's starting :class:`TrainingState` (in its
    first two rounds), or every replica's result of the round before the
    previous one, whose mean is folded in. Except in the epoch's first
    round, the replica starts from its own result of the previous round,
    read where task ``(after, round - 1, replica)`` keeps it on this
    worker. Corrects the replica's own parameters by what the anchor
    gained less what the replica had sent, runs ``plan.n_steps`` local
    steps and packs the change they made.
    """
    from distributed import get_worker

    t_begin = time.time()
    owner = replica_owner(plan.replica)
    previous, mean, sent_bounds = inputs[0], None, None
    if after is not None:
        previous = _previous(plan, after)
        if not isinstance(inputs[0], TrainingState):
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
        buffers, optimizer = prev.buffers, prev.optimizer
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
    """The epoch's final state: the anchor with its last two rounds' means folded in.

    The ``daskdist-average`` task that ends an overlapped epoch, on replica
    0's worker. ``results`` are every replica's results of the last round,
    then, where the epoch has more than one round, of the round before.
    """
    last, before = results[:n_replicas], results[n_replicas:]
    own = _original(last[0])
    anchor = own.anchor
    if before:
        anchor = fold(anchor, round_mean(before, replica_workers), replica_workers, emit=True)
    final = fold(anchor, round_mean(last, replica_workers), replica_workers, emit=True)
    # replica 0's own optimizer state stands for the replicas' (each keeps its own)
    final = replace(final, optimizer=own.optimizer)
    return keep(own.plan.run_id, GLOBAL, final.round, final)
