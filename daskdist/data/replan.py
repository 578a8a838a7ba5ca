"""Shards planned again for a new set of replicas, moving only the rows that must move.

When replicas join or leave a fit (:mod:`daskdist.driver.membership`), each
replica's share of the training rows changes. :func:`replan` decides which
rows go where: a replica that stays keeps as many of its own rows as its new
share allows (a prefix of them), a replica's surplus and a leaving replica's
rows fill the shares of the others. The rows moved are then exactly the sum
of the surpluses, the least any plan can move.

The new shards are built on the workers from the old ones
(:func:`rows_of` on the worker of each old shard, :func:`assemble` on the new
shard's worker), so rows travel between workers and never through the client.
Every shard's hold-out rows stay held out: a staying replica keeps its own, a
leaving replica's go to the replica that takes the most of its rows, and a
new replica starts with none.

A shard made this way is described by a :class:`Recipe` over the shards the
fit started with (its *base* shards), so that a shard lost with its worker is
built again from the data source (base shards, then the same selection).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from ..plan import EpochRemainder, shard_order
from ..seeds import seed_for
from .named import each, take
from .shards import Shard

__all__ = ["shares", "replan", "Recipe", "base_recipes", "compose", "remainders", "rows_of",
           "assemble", "with_remainder", "ShardRows"]


def shares(total: int, weights) -> list[int]:
    """``total`` split in proportion to ``weights`` (largest remainders; sums to ``total``)."""
    weights = np.asarray(weights, dtype=float)
    if weights.ndim != 1 or len(weights) == 0 or (weights <= 0).any():
        raise ValueError(f"weights must be positive, one per replica; got {weights.tolist()}")
    exact = total * weights / weights.sum()
    out = np.floor(exact).astype(int)
    order = np.argsort(-(exact - out), kind="stable")
    out[order[:total - out.sum()]] += 1
    return out.tolist()


def replan(sizes, keep, targets) -> list[list[tuple[int, int, int]]]:
    """Which rows of the old shards make each new shard.

    Parameters
    ----------
    sizes : sequence of int
        Training rows of each old shard.
    keep : sequence of int or None
        For each new shard, the old shard it continues (its replica stays),
        or None for a new replica. An old shard named by none is leaving.
    targets : sequence of int
        Training rows of each new shard; they sum to ``sum(sizes)``.

    Returns
    -------
    list of list of (old shard, start, stop)
        For each new shard, the ranges of old shards' training rows it
        takes, in order: its own kept prefix first.
    """
    if sum(targets) != sum(sizes) or len(keep) != len(targets):
        raise ValueError(f"targets {list(targets)} do not split the {sum(sizes)} rows of "
                         f"{list(sizes)} over {len(keep)} shards")
    kept_by = {old: new for new, old in enumerate(keep) if old is not None}
    plan: list[list[tuple[int, int, int]]] = [[] for _ in targets]
    pool = []  # (old shard, start, stop) of the rows that move
    for old, size in enumerate(sizes):
        new = kept_by.get(old)
        kept = 0 if new is None else min(size, targets[new])
        if kept:
            plan[new].append((old, 0, kept))
        if kept < size:
            pool.append((old, kept, size))
    for new, target in enumerate(targets):
        need = target - sum(stop - start for _, start, stop in plan[new])
        while need > 0:
            old, start, stop = pool[0]
            take_n = min(need, stop - start)
            plan[new].append((old, start, start + take_n))
            need -= take_n
            if start + take_n == stop:
                pool.pop(0)
            else:
                pool[0] = (old, start + take_n, stop)
    return plan


@dataclass(frozen=True)
class Recipe:
    """A shard as a selection of the base shards' rows.

    Attributes
    ----------
    parts : tuple of (int, numpy.ndarray)
        ``(base shard, positions of its training rows)``, in order.
    valid : tuple of int
        The base shards whose hold-out rows it holds.
    """

    parts: tuple
    valid: tuple
    #: The rows its epoch has left to visit, when it was made mid-epoch
    #: (:class:`daskdist.plan.EpochRemainder`; None: made between epochs).
    remainder: object = None

    def __len__(self) -> int:
        return sum(len(positions) for _, positions in self.parts)

    @property
    def bases(self) -> list[int]:
        """The base shards it takes rows from."""
        return sorted({base for base, _ in self.parts} | set(self.valid))


def base_recipes(sizes) -> list[Recipe]:
    """The recipes of the base shards themselves (all their rows and their hold-out)."""
    return [Recipe(((i, np.arange(size)),), (i,)) for i, size in enumerate(sizes)]


def compose(recipes: list[Recipe], plan, keep) -> list[Recipe]:
    """The recipes of the shards :func:`replan` made from shards of ``recipes``.

    A leaving shard's hold-out goes to the new shard that takes the most of
    its rows.
    """
    valid: list[list[int]] = [list(recipes[old].valid) if old is not None else [] for old in keep]
    for old in set(range(len(recipes))) - {o for o in keep if o is not None}:
        taken = [sum(stop - start for o, start, stop in ranges if o == old) for ranges in plan]
        valid[int(np.argmax(taken))].extend(recipes[old].valid)
    out = []
    for new, ranges in enumerate(plan):
        parts = []
        for old, start, stop in ranges:
            parts.extend(_select(recipes[old].parts, start, stop))
        out.append(Recipe(tuple(_merge(parts)), tuple(valid[new])))
    return out


def _select(parts, start: int, stop: int) -> list:
    """Rows ``start:stop`` of a shard made of ``parts``, as parts."""
    out, offset = [], 0
    for base, positions in parts:
        lo, hi = max(start - offset, 0), min(stop - offset, len(positions))
        if lo < hi:
            out.append((base, positions[lo:hi]))
        offset += len(positions)
    return out


def _merge(parts) -> list:
    """Consecutive parts of the same base as one."""
    out = []
    for base, positions in parts:
        if out and out[-1][0] == base:
            out[-1] = (base, np.concatenate([out[-1][1], positions]))
        else:
            out.append((base, positions))
    return out


def remainders(sizes, batch, previous, plan, *, epoch: int, step: int, random_state: int,
               shuffle: bool) -> list[EpochRemainder]:
    """What each new shard of ``plan`` has left to visit of ``epoch``, re-planned at ``step``.

    Parameters
    ----------
    sizes, batch : sequence of int
        Training rows and per-step batch of each old shard.
    previous : sequence of EpochRemainder or None
        Each old shard's remainder, when it was itself made earlier in ``epoch``.
    plan : list of list of (old shard, start, stop)
        :func:`replan`'s answer.
    epoch, step : int
        The epoch, and the step of it that every replica reached.
    random_state, shuffle
        The fit's: how each old replica orders its shard in the epoch.

    Returns
    -------
    list of EpochRemainder
        One per new shard: the rows it holds that no replica visited in the
        epoch so far, in the order the rest of the epoch visits them
        (shuffled when the fit shuffles). Together they hold every row not
        yet visited, once.
    """
    left = []
    for o, size in enumerate(sizes):
        before = previous[o] if previous is not None else None
        if before is not None and before.epoch == epoch:
            left.append(before.left_after(step, batch[o]))
        else:
            order = shard_order(size, random_state, epoch, o, shuffle)
            left.append(order[step * batch[o]:])
    out = []
    for j, ranges in enumerate(plan):
        pieces, offset = [], 0
        for o, start, stop in ranges:
            rows = left[o][(left[o] >= start) & (left[o] < stop)]
            pieces.append(rows - start + offset)
            offset += stop - start
        positions = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int64)
        if shuffle:
            rng = np.random.default_rng(seed_for(random_state, 4, epoch, step, j))
            positions = positions[rng.permutation(len(positions))]
        out.append(EpochRemainder(epoch, step, positions.astype(np.int64)))
    return out


# -- on the workers ----------------------------------------------------------------------------
@dataclass
class ShardRows:
    """Some training rows of a shard (and, when asked, its hold-out), on their way."""

    X: object
    y: np.ndarray | None
    w: np.ndarray | None
    X_valid: object = None
    y_valid: np.ndarray | None = None

    def __sizeof__(self) -> int:
        arrays = [*_leaves(self.X), self.y, self.w, *_leaves(self.X_valid), self.y_valid]
        return object.__sizeof__(self) + sum(a.nbytes for a in arrays if a is not None)


def _leaves(X) -> list:
    if X is None:
        return []
    return list(X.values()) if isinstance(X, dict) else [X]


def rows_of(shard: Shard, rows, with_valid: bool = False) -> ShardRows:
    """Training rows ``rows`` (a slice or positions) of ``shard``, and its hold-out if asked."""
    part = ShardRows(take(shard.X, rows), None if shard.y is None else shard.y[rows],
                     None if shard.w is None else shard.w[rows])
    if with_valid:
        part.X_valid, part.y_valid = shard.X_valid, shard.y_valid
    return part


def with_remainder(shard, remainder):
    """``shard`` on this task's worker, with the rows its epoch has left (None: as it is).

    Its arrays are shared, not copied.
    """
    return shard if remainder is None else replace(shard, remainder=remainder)


def assemble(parts: list[ShardRows], replica: int, remainder=None) -> Shard:
    """One shard of ``parts`` (in order), for ``replica``; the hold-outs they carry joined.

    ``remainder``: the rows its epoch has left, when it is made mid-epoch.
    """
    def join(arrays):
        arrays = [a for a in arrays if a is not None]
        if not arrays:
            return None
        if isinstance(arrays[0], dict):
            return {key: np.concatenate([a[key] for a in arrays]) for key in arrays[0]}
        return np.concatenate(arrays)

    X = join([p.X for p in parts])
    valid = [p for p in parts if p.X_valid is not None]
    if valid:
        X_valid = join([p.X_valid for p in valid])
        y_valid = join([p.y_valid for p in valid])
    else:  # no hold-out of its own: an empty one shaped like the rows
        X_valid = each(X, lambda a: a[:0])
        y_valid = None if parts[0].y is None else parts[0].y[:0]
    return Shard(X, join([p.y for p in parts]), X_valid, y_valid, replica,
                 w=join([p.w for p in parts]), remainder=remainder)
