"""Shards and replicas' own parts rebuilt for a new set of replicas.

When replicas join, leave (:mod:`.membership`) or are balanced
(:mod:`.balance`), :func:`reshard` builds each new shard on its worker from
the old ones: in-memory shards from rows cut on the old shards' workers
(:mod:`daskdist.data.replan`), streamed shards from whole chunks, whose
readers move and which the new replica then reads itself. Nothing passes
through the client but the plan. What replicas keep of their own follows
them.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
from distributed import KilledWorker
from distributed.client import FutureCancelledError

from ..data import replan
from ..data.streaming import join_stream_pieces, stream_piece
from ..worker.devices import is_cuda
from . import recovery

__all__ = ["reshard", "reshard_to", "steps_per_epoch", "gather_shard_sizes"]


def _shard_sizes(shard):
    return len(shard), shard.n_valid


def gather_shard_sizes(trainer) -> list:
    """Wait for the shards to be built; re-send those lost with a worker; their sizes."""
    while True:
        sizes = [trainer.client.submit(_shard_sizes, shard, pure=False,
                                       key=trainer.task_key("size", i))
                 for i, shard in enumerate(trainer.shards)]
        try:
            trainer.wait(sizes)  # (a lost shard makes the gather raise)
            return trainer.client.gather(sizes)
        except KilledWorker as error:
            raise recovery.shard_failed(error) from error
        except FutureCancelledError:
            lost = recovery.lost_shards(trainer.shards)
            if not lost:
                raise
            trainer.shard_losses.count(lost, recovery.shard_rows(trainer),
                                       "while the shards were built")
            recovery.replace_lost_shards(trainer)
        finally:
            for future in sizes:
                future.release()


def reshard_to(trainer, weights, replica_steps) -> None:
    """Re-plan the same replicas' shards in proportion to ``weights`` (:mod:`.balance`).

    ``replica_steps``: each replica's local steps per round from now on.
    """
    n = len(trainer.shards)
    reshard(trainer, list(range(n)), list(trainer.replica_workers), weights=weights,
            replica_steps=replica_steps)


def steps_per_epoch(sizes, batch, replica_steps=None, round_steps: int = 1) -> int:
    """Optimizer steps of an epoch over shards of ``sizes`` with per-step ``batch``.

    With ``replica_steps`` (balanced replicas) it is ``round_steps`` times the
    rounds the slowest-to-finish replica needs.
    """
    if replica_steps is None:
        return max(-(-s // b) for s, b in zip(sizes, batch))
    return round_steps * max(-(-_ceil(s, b) // k) for s, b, k in zip(sizes, batch, replica_steps))


def _ceil(a: int, b: int) -> int:
    return -(-a // b)


def reshard(trainer, keep: list, workers: list[str], step: int | None = None,
            weights=None, replica_steps=None) -> None:
    """Build the new shards from the old ones, and carry the replicas' own parts over.

    ``step``: mid-epoch, the epoch's step reached; each new shard then carries
    the rows the epoch has left (:func:`daskdist.data.replan.remainders`).
    ``weights``: shard sizes in proportion to them (default: equal shares,
    or the same sizes for the same replicas); ``replica_steps``: the local
    steps per round of balanced replicas (None: every replica the strategy's).
    """
    if trainer.shard_set.streaming:
        _restream(trainer, keep, workers, weights, replica_steps)
        return
    old_sizes = list(trainer.shard_sizes)
    n = len(keep)
    if weights is not None:
        targets = replan.shares(sum(old_sizes), weights)
    elif n == len(old_sizes) and keep == list(range(n)):
        targets = old_sizes  # same replicas, other workers: every shard moves whole
    else:
        targets = replan.shares(sum(old_sizes), [1] * n)
    plan = replan.replan(old_sizes, keep, targets)
    recipes = trainer.recipes or replan.base_recipes(
        [len(rows) for rows in trainer.shard_set.plan])
    new_recipes = replan.compose(recipes, plan, keep)
    left = [None] * n
    if step is not None:
        left = replan.remainders(
            old_sizes, trainer.replica_batch, [r.remainder for r in recipes], plan,
            epoch=trainer.epoch, step=step, random_state=trainer.random_state,
            shuffle=trainer.shuffle)
        new_recipes = [replace(r, remainder=rest) for r, rest in zip(new_recipes, left)]
    holders = {i: set(r.valid) for i, r in enumerate(recipes)}
    client, current = trainer.client, trainer.replica_workers
    trainer.generation += 1
    shards = []
    for j, ranges in enumerate(plan):
        old = keep[j]
        whole = (old is not None and ranges == [(old, 0, old_sizes[old])]
                 and new_recipes[j].valid == recipes[old].valid)
        if whole and workers[j] == current[old] and step is None:
            shards.append(trainer.shards[old])  # unchanged, where it was
            continue
        if whole:  # moves whole (mid-epoch, with the rows its epoch has left)
            shards.append(client.submit(
                replan.with_remainder, trainer.shards[old], left[j],
                key=trainer.task_key("shard", j), workers=[workers[j]],
                allow_other_workers=True, pure=False))
            continue
        valid_from = {o for o, r in holders.items() if set(new_recipes[j].valid) & r}
        parts = []
        for k, (o, start, stop) in enumerate(ranges):
            parts.append(client.submit(
                replan.rows_of, trainer.shards[o], slice(start, stop), o in valid_from,
                key=trainer.task_key("rows", j, k), workers=[current[o]],
                allow_other_workers=True, pure=False))
            valid_from.discard(o)
        for k, o in enumerate(sorted(valid_from)):
            parts.append(client.submit(
                replan.rows_of, trainer.shards[o], slice(0, 0), True,
                key=trainer.task_key("rows-valid", j, k), workers=[current[o]],
                allow_other_workers=True, pure=False))
        shards.append(client.submit(replan.assemble, parts, j, left[j],
                                    key=trainer.task_key("shard", j), workers=[workers[j]],
                                    allow_other_workers=True, pure=False))
    trainer.recipes = new_recipes
    _adopt(trainer, shards, workers, replica_steps)
    if step is not None:  # the rest of this epoch: the steps its remainders take
        trainer.epoch_steps = (trainer.epoch, step + max(
            -(-len(rest.positions) // b) for rest, b in zip(left, trainer.replica_batch)))
    _carry_own(trainer, keep, plan, len(old_sizes))


def _restream(trainer, keep: list, workers: list[str], weights=None,
              replica_steps=None) -> None:
    """:func:`reshard` for streamed shards: new shards of whole chunks of the old ones.

    The chunks are planned as rows are (a staying replica keeps a prefix of
    its chunks, the fewest chunks move); a chunk's reader (its small task
    graph) and hold-out rows move, never its data: the new replica reads its
    chunks itself, from where the input comes from.
    """
    chunks = trainer.stream_chunks or trainer.shard_set.source.stream_chunks()
    counts = [len(c) for c in chunks]
    n, current = len(keep), trainer.replica_workers
    if min(counts) < 1 or sum(counts) < n:
        raise ValueError(f"{sum(counts)} chunks cannot make {n} streamed shards")
    targets = (replan.shares(sum(counts), weights) if weights is not None
               else counts if keep == list(range(len(counts)))
               else replan.shares(sum(counts), [1] * n))
    plan = replan.replan(counts, keep, targets)
    trainer.generation += 1
    shards = []
    for j, ranges in enumerate(plan):
        old = keep[j]
        if old == j and ranges == [(old, 0, counts[old])] and workers[j] == current[old]:
            shards.append(trainer.shards[old])  # unchanged, where it was
            continue
        pieces = [trainer.client.submit(
            stream_piece, trainer.shards[o], list(range(start, stop)),
            key=trainer.task_key("chunks", j, k), workers=[current[o]],
            allow_other_workers=True, pure=False) for k, (o, start, stop) in enumerate(ranges)]
        shards.append(trainer.client.submit(
            join_stream_pieces, pieces, j, key=trainer.task_key("shard", j),
            workers=[workers[j]], allow_other_workers=True, pure=False))
    trainer.stream_chunks = [[chunks[o][s] for o, start, stop in ranges
                              for s in range(start, stop)] for ranges in plan]
    _adopt(trainer, shards, workers, replica_steps)
    _carry_own(trainer, keep, plan, len(counts))


def _adopt(trainer, shards: list, workers: list[str], replica_steps=None) -> None:
    """Make ``shards`` (on ``workers``) the fit's, with their sizes, batches and steps."""
    n, joined = len(shards), set(workers) - set(trainer.replica_workers)
    trainer.shards, trainer.replica_workers = shards, list(workers)
    trainer.shard_losses = recovery.ShardLosses(n)
    if joined and is_cuda(trainer.spec.device):
        trainer._plan_devices()  # the new workers' GPUs
        trainer.spec_future = trainer.submit_spec()
    sizes = gather_shard_sizes(trainer)
    trainer.shard_sizes = [s[0] for s in sizes]
    trainer.valid_sizes = [s[1] for s in sizes]
    trainer.replica_batch = [trainer.batch_size // n + (1 if i < trainer.batch_size % n else 0)
                             for i in range(n)]
    trainer.replica_steps = replica_steps
    trainer.steps_per_epoch = steps_per_epoch(trainer.shard_sizes, trainer.replica_batch,
                                              replica_steps, trainer.strategy.round_steps())


def _carry_own(trainer, keep: list, plan, n_old: int) -> None:
    """Each replica's own part under its new index; leaving replicas' residuals passed on.

    The state's parameters stay on their worker: only the parts (gathered at
    the epoch's end) travel, in a task that puts them into the state there.
    """
    state = trainer._epoch_state
    if not state.own:
        return  # no replica keeps anything of its own
    own = {f"replica {j}": dict(state.own.get(f"replica {old}", {})) if old is not None else {}
           for j, old in enumerate(keep)}  # a new replica starts with an empty part
    for old in sorted(set(range(n_old)) - set(keep)):
        residual = state.own.get(f"replica {old}", {}).get("residual")
        if residual is None:
            continue
        taken = [sum(stop - start for o, start, stop in ranges if o == old) for ranges in plan]
        heir = own[f"replica {int(np.argmax(taken))}"]
        # the residual is what the replica has not sent yet: it goes on with its rows
        heir["residual"] = residual if heir.get("residual") is None else (
            heir["residual"] + residual)
    owners = set(trainer.strategy.owners(trainer.replica_workers))
    own.update({k: v for k, v in state.own.items()
                if not k.startswith("replica ") and k in owners})
    state = replace(state, own=own)
    trainer._epoch_state = state
    trainer._state = trainer.client.submit(
        _with_own, trainer._state, own, key=trainer.task_key("state-own", trainer.round),
        pure=False)
    trainer.tracker.reset(state.round, trainer._state)


def _with_own(state, own: dict):
    """``state`` (on its worker) with the replicas' parts ``own``."""
    return replace(state, own=own)
