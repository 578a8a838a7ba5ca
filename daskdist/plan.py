"""What one replica does in one round: the plan the driver sends with each task."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .seeds import seed_for

__all__ = ["RoundPlan", "StepTable", "EpochRemainder", "epoch_order", "shard_order"]


@dataclass(frozen=True)
class StepTable:
    """The optimizer hyperparameters of each step of an epoch, as a per-step schedule sets them.

    ``values[step, group, column]``; ``columns`` name what each column is:
    ``(key, None)`` for a number (``("lr", None)``), ``(key, i)`` for entry
    ``i`` of a tuple (``("betas", 0)``). A few KB for thousands of steps, so
    that every round's plan can carry its epoch's table.
    """

    columns: tuple
    values: np.ndarray

    def __len__(self) -> int:
        return len(self.values)

    def at(self, step: int) -> list[dict]:
        """One dict per parameter group: the hyperparameters of the epoch's step ``step``."""
        row = self.values[min(step, len(self.values) - 1)]
        groups = []
        for values in row:
            group: dict = {}
            for (key, index), value in zip(self.columns, values.tolist()):
                if index is None:
                    group[key] = value
                else:
                    group.setdefault(key, []).append(value)
            groups.append({k: tuple(v) if isinstance(v, list) else v for k, v in group.items()})
        return groups


@dataclass(frozen=True)
class RoundPlan:
    """What one replica does in one round.

    Attributes
    ----------
    run_id : str
        Identifies the fit (worker caches are keyed by it).
    replica : int
        Replica index.
    epoch : int
        Epoch index (0-based, counted over the whole fit).
    round : int
        Round index over the whole fit.
    first_step : int
        Index, within the epoch, of the round's first step.
    n_steps : int
        Optimizer steps in this round.
    batch_size : int
        This replica's share of the global batch.
    lr : float or tuple of float
        Learning rate for every step of the round (one per parameter group).
    random_state : int
        Seed of the fit; shuffles and torch seeds derive from it.
    shuffle : bool
        Reshuffle the shard every epoch.
    max_non_finite : int or None
        Non-finite replica updates the fit tolerates before it fails with
        :class:`~daskdist.errors.NonFiniteError` (``None``: any number).
    epoch_steps : int or None
        Steps in a whole epoch, so that the round that ends an epoch can count
        it as completed (``None``: not known).
    compression : {None, "fp16", "bf16", "topk"}
        How the replica packs what it sends (:mod:`daskdist.compression`).
    density : float
        Share of entries ``"topk"`` sends.
    schedule : StepTable or None
        A per-step schedule's optimizer hyperparameters for every step of the
        epoch, set before each step (:mod:`daskdist.schedules`). ``None``:
        ``lr`` for every step.
    outer : OuterSGD or None
        ``diloco``'s outer optimizer, which turns the mean parameter change
        of a round into the next global parameters
        (:mod:`daskdist.worker.outer`). ``None``: the mean change is applied
        as it is.
    fragments : int
        ``diloco``'s fragments: each overlapped round exchanges one of them
        (:mod:`daskdist.worker.fragments`; 1: the whole parameter vector).
    schedule_stride : float
        Rows of ``schedule`` per step of this replica: a balanced replica
        that takes ``k_i`` local steps where the round has ``k`` reads row
        ``floor(step * k / k_i)`` (:mod:`daskdist.driver.balance`).
    """

    run_id: str
    replica: int
    epoch: int
    round: int
    first_step: int
    n_steps: int
    batch_size: int
    lr: float | tuple
    random_state: int
    shuffle: bool = False
    max_non_finite: int | None = None
    epoch_steps: int | None = None
    compression: str | None = None
    density: float = 0.01
    schedule: StepTable | None = None
    outer: object = None
    fragments: int = 1
    schedule_stride: float = 1.0

    def hyper(self, k: int) -> list[dict] | None:
        """One dict per parameter group: the hyperparameters of the round's step ``k``.

        ``None`` without a per-step schedule (``lr`` holds for every step).
        """
        if self.schedule is None:
            return None
        return self.schedule.at(int((self.first_step + k) * self.schedule_stride))

    def epochs_completed(self) -> int:
        """Epochs completed once this round is done (``epoch``, or one more at its end)."""
        ends_epoch = (self.epoch_steps is not None
                      and self.first_step + self.n_steps >= self.epoch_steps)
        return self.epoch + int(ends_epoch)

    def positions(self, n_samples: int, remainder: EpochRemainder | None = None
                  ) -> list[np.ndarray]:
        """Shard positions of each step's batch (empty once the shard is exhausted).

        With a ``remainder`` of this epoch (the shard was re-planned mid-epoch)
        the steps from its ``first_step`` on take its positions in turn.
        """
        b = self.batch_size
        if (remainder is not None and remainder.epoch == self.epoch
                and self.first_step >= remainder.first_step):
            order, first = remainder.positions, self.first_step - remainder.first_step
        else:
            order, first = epoch_order(n_samples, self), self.first_step
        return [order[(first + k) * b:(first + k + 1) * b] for k in range(self.n_steps)]


@dataclass(frozen=True)
class EpochRemainder:
    """The rows of a shard that an epoch interrupted by a change of replicas has left to visit.

    When replicas join or leave between two rounds
    (:mod:`daskdist.driver.membership`), each new shard carries the rows it
    holds that no replica has trained on yet in the epoch, in the order the
    rest of the epoch visits them, so that the epoch still visits every row
    once.

    Attributes
    ----------
    epoch : int
        The epoch it belongs to (other epochs use the shard's own order).
    first_step : int
        The epoch's step at which the shard was re-planned.
    positions : numpy.ndarray
        Shard positions of the rows left, in visiting order.
    """

    epoch: int
    first_step: int
    positions: np.ndarray

    def left_after(self, step: int, batch_size: int) -> np.ndarray:
        """The positions still to visit once the epoch reached ``step``."""
        return self.positions[max(step - self.first_step, 0) * batch_size:]


def epoch_order(n_samples: int, plan: RoundPlan) -> np.ndarray:
    """A replica's order of its shard's rows in the plan's epoch (seeded when shuffled)."""
    return shard_order(n_samples, plan.random_state, plan.epoch, plan.replica, plan.shuffle)


def shard_order(n_samples: int, random_state: int, epoch: int, replica: int,
                shuffle: bool) -> np.ndarray:
    """The order replica ``replica`` visits its shard's rows in ``epoch``."""
    if not shuffle:
        return np.arange(n_samples)
    rng = np.random.default_rng(seed_for(random_state, 1, epoch, replica))
    return rng.permutation(n_samples)
