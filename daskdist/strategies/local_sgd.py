"""``local_sgd``: local steps on each replica, then parameter averaging.

The policy; the replicas' tasks are :func:`daskdist.worker.replica.local_round`
and :func:`daskdist.worker.aggregation.average_parameters`, or, compressed,
those of :mod:`daskdist.worker.delta_tasks`.
"""

from __future__ import annotations

from dataclasses import replace

from ..compression import check_compression
from ..worker.aggregation import average_parameters
from ..worker.delta_tasks import delta_round, finish_deltas
from ..worker.replica import local_round
from .base import RoundStrategy
from .deadline import DeadlineOption
from .overlap import finish_overlapped, submit_overlapped

__all__ = ["LocalSGD"]


class LocalSGD(DeadlineOption, RoundStrategy):
    """Local SGD: ``sync_every`` local steps per replica, then average parameters.

    Implements periodic parameter averaging as analysed in Lin et al. 2018,
    "Don't Use Large Mini-Batches, Use Local SGD", and Stich 2019, "Local SGD
    Converges Fast and Communicates Little". Optimizer state (momentum, Adam
    moments) is averaged with the parameters, so a replica can be rebuilt from
    the averaged state alone. With ``sync_every=1`` and plain SGD it equals
    :class:`~daskdist.strategies.Sync`.

    With ``compression`` (``"fp16"``, ``"bf16"``, or ``"topk"`` with error
    feedback, as for :class:`~daskdist.strategies.Sync`), replicas exchange
    packed parameter deltas instead, and each applies their average itself
    (:mod:`daskdist.worker.delta_tasks`); optimizer state then stays
    on each replica.

    With ``deadline``, a round closes without the replicas that are late by
    more than ``deadline`` times the running median of round durations; their
    updates are folded into a later round, never lost
    (:mod:`daskdist.strategies.deadline`). Without a straggler it trains like
    plain ``local_sgd`` (replicas exchange deltas through the client's loop
    instead of meeting in an averaging task). With a deadline and
    ``compression``, the parameters' deltas are packed, and optimizer state
    is averaged with them unpacked (every replica starts each round from the
    newest global state).

    With ``overlap=True`` a replica does not wait for a round's average: it
    starts the next round from its own parameters while the average is
    formed, and folds it in one round late (the delayed averaging of
    CoCoD-SGD, Shen et al. 2019, arXiv 1906.12043, and Overlap-Local-SGD,
    Wang et al. 2020, arXiv 2002.09539; the exact update rule is in
    :mod:`daskdist.worker.overlap_tasks`). The exchange then runs behind
    compute instead of between rounds. It changes the maths (a replica
    trains one round on parameters that lack the latest average), exchanges
    parameter deltas as compression does (float32 without it), and keeps
    optimizer state on each replica. An epoch ends with every average folded
    in, so epochs, checkpoints and recoveries start from one global state; a
    worker lost mid-epoch restarts the epoch.

    Parameters
    ----------
    sync_every : int
        Local optimizer steps between two averages.
    compression : {None, "fp16", "bf16", "topk"}
        How parameter deltas are packed for the exchange (None: parameters
        are averaged as they are, optimizer state included).
    density : float
        Share of delta entries ``"topk"`` sends per round.
    deadline : float or None
        Close a round once it has run this many times the running median of
        round durations (None: every round waits for every replica).
    overlap : bool
        Fold each round's average in one round late, so that the exchange
        runs while the next round computes.
    balance : bool
        Balance replicas of mixed speed: from the second epoch on, each
        replica's local steps per round and shard size follow its measured
        speed, so that all finish a round together; the average weights each
        by the samples it trained on (:mod:`daskdist.driver.balance`).
    """

    name = "local_sgd"
    replica_task = staticmethod(local_round)
    finalize = staticmethod(average_parameters)

    def __init__(self, sync_every: int = 8, compression: str | None = None,
                 density: float = 0.01, deadline: float | None = None, overlap: bool = False,
                 balance: bool = False):
        self.sync_every = sync_every
        self.compression = compression
        self.density = density
        self.deadline = deadline
        self.overlap = overlap
        self.balance = balance
        self.validate()

    @property
    def exchanges_deltas(self) -> bool:
        """Whether replicas exchange parameter deltas (:mod:`~daskdist.worker.delta_tasks`)."""
        return self.compression is not None or self.overlap

    @property
    def replica_copies(self) -> bool:
        # exchanging deltas, each replica applies the mean delta to its own copy (overlapped,
        # the copies differ by design until the epoch's end)
        return self.exchanges_deltas and self.deadline is None and not self.overlap

    def validate(self) -> None:
        if not isinstance(self.sync_every, (int,)) or isinstance(self.sync_every, bool) \
                or self.sync_every < 1:
            raise ValueError(f"sync_every must be a positive integer, got {self.sync_every!r}.")
        check_compression(self.compression, self.density)
        self.check_deadline()
        if not isinstance(self.overlap, bool):
            raise ValueError(f"overlap must be True or False, got {self.overlap!r}.")
        if not isinstance(self.balance, bool):
            raise ValueError(f"balance must be True or False, got {self.balance!r}.")
        if self.balance and (self.deadline is not None or self.overlap):
            raise ValueError(
                "balance=True cannot be combined with a deadline or overlap=True: balancing "
                "plans each replica's local steps per round so that none waits for another, "
                "which the deadline's loop and the overlapped rounds plan otherwise.")
        if self.overlap and self.deadline is not None:
            raise ValueError("overlap=True cannot be combined with a deadline: an overlapped "
                             "round already goes on without waiting for the average, so no "
                             "replica waits on a straggler until the next round's end.")

    def round_steps(self) -> int:
        return self.sync_every

    def resizes_mid_epoch(self) -> bool:
        # exchanging deltas, replicas keep residuals or optimizer state of their own
        return not self.exchanges_deltas and self.deadline is None and not self.balance

    def submit_round(self, ctx, state, plans):
        if self.overlap:
            groups = self.overlap_groups(list(ctx.info.replica_workers))
            return submit_overlapped(ctx, state, plans, groups=groups)
        if not self.exchanges_deltas:
            return super().submit_round(ctx, state, plans)
        return self.submit_exchange(ctx, delta_round, state, plans)

    def overlap_groups(self, replica_workers: list[str]):
        """Groups whose sums an overlapped round folds in, two rounds late (None: flat)."""
        return None

    def tracked(self, round_output):
        if self.overlap:
            return round_output[0][0]
        return round_output[0] if self.exchanges_deltas else round_output

    def state_round(self, plan_round: int) -> int:
        # a delta result carries the state its round started from (overlapped: none, but
        # the round is done)
        return plan_round if self.exchanges_deltas and not self.overlap else plan_round + 1

    def finish_epoch(self, ctx, round_output, plans):
        if self.overlap:
            return finish_overlapped(ctx, round_output, plans)
        if not self.exchanges_deltas:
            return round_output
        last = plans[0]
        workers = ctx.info.replica_workers
        return ctx.submit(finish_deltas, ctx.spec, *round_output, plan=replace(last, replica=0),
                          replica_workers=workers, key=ctx.key("average", last.round),
                          worker=workers[0])

    def round_sizes(self, steps_per_epoch: int) -> list[int]:
        k = self.sync_every
        return [min(k, steps_per_epoch - s) for s in range(0, steps_per_epoch, k)]
