"""Recovery after a lost worker: continue from the newest state a live worker holds.

When a worker dies it takes with it what Dask cannot recompute: the shards
sent from the client, and the newest rounds' states (and a held state whose
lineage reaches such a shard is forgotten by the scheduler too). The driver
then (:func:`recover`) stops the rounds in flight, finds the newest training
state still held — in a round output it tracks, or in a live worker's state
store (:mod:`daskdist.worker.runtime`) — re-sends the lost shards to live
workers, moves their replicas there, and continues the epoch from that
state: at most the round in progress is lost, and every round's update is
applied once. What replicas keep of their own (:mod:`daskdist.worker.own_state`:
``topk`` residuals, their own optimizer state, fp16 loss scalers) goes with
the state when every replica's part is still held; when a lost worker took
a part that held something, the epoch continues from its start instead, so
that recovery stays exact (:mod:`daskdist.driver.own_parts`). A shard whose
workers keep dying is a *poison* shard: the fit stops with a
:class:`~daskdist.errors.ShardFailedError` instead (:class:`ShardLosses`).
"""

from __future__ import annotations

import logging
import re

import dask
from distributed.client import FutureCancelledError

from ..data import replan
from ..errors import ShardFailedError
from ..state import TrainingState
from ..worker import runtime
from .own_parts import with_own_parts
from .waiting import LOST

__all__ = ["recover", "newest_state", "read_state", "replace_lost_shards", "submit_shard",
           "ShardLosses", "shard_failed", "shard_rows"]

logger = logging.getLogger(__name__)

#: Seconds to wait for a worker to hand back a finished round's state.
READ_BACK_TIMEOUT = 10
#: Keys of the tasks that belong to one shard (its build, its rounds); group 1: the shard.
_SHARD_TASK = re.compile(r"\('daskdist-(?:shard|round)-[^']*', (?:\d+, )?(\d+)\)$")


def shard_failed(error) -> ShardFailedError:
    """Name the shard behind a task Dask gave up on (a :class:`distributed.KilledWorker`)."""
    match = _SHARD_TASK.match(str(error.task))
    replica = int(match.group(1)) if match else None
    what = "a task of this fit" if replica is None else f"shard {replica}"
    return ShardFailedError(
        f"Task {error.task!r} ({what}) killed {error.allowed_failures + 1} workers in a "
        "row, so Dask gave up on it (distributed.scheduler.allowed-failures): its data "
        "seems to crash the worker process (out of memory, or a crash in compiled code). "
        "Training stopped; the cluster is still usable.", replica)


class ShardLosses:
    """Workers lost in a row, per shard; a shard past the limit is a poison shard."""

    def __init__(self, n_shards: int):
        self.counts = [0] * n_shards

    def count(self, lost: list[int], sizes, reason: str) -> None:
        """Count a loss of the ``lost`` shards (reset the others); raise on a poison shard.

        ``sizes``: each shard's rows (for the message).
        """
        self.counts = [(c + 1) if i in lost else 0 for i, c in enumerate(self.counts)]
        allowed = dask.config.get("distributed.scheduler.allowed-failures")
        worst = max(range(len(self.counts)), key=self.counts.__getitem__)
        if self.counts[worst] > allowed:
            raise ShardFailedError(
                f"The workers holding shard {worst} ({sizes[worst]} samples) died "
                f"{self.counts[worst]} times in a row ({reason}): a task of that shard "
                "seems to kill its worker (out of memory, or a crash in compiled code on some "
                "rows). Training stopped; the cluster is still usable "
                "(distributed.scheduler.allowed-failures).", worst)


def shard_rows(trainer) -> list[int]:
    """Rows of each of ``trainer``'s shards as planned (for messages)."""
    if trainer.recipes is not None:
        return [len(recipe) for recipe in trainer.recipes]
    return [len(rows) for rows in trainer.shard_set.plan]


def lost_shards(shards) -> list[int]:
    """The shards whose data went with a worker."""
    return [i for i, f in enumerate(shards) if f.status in LOST]


def read_state(client, future) -> TrainingState | None:
    """The training state in a finished round output, or ``None`` if none can be read.

    A round result may keep its state on the worker that made it (copies
    elsewhere have none): ask every holder.
    """
    holders = sorted(client.who_has(future).get(future.key, ()))
    readers = [client.submit(_state_of, future, pure=False, workers=[holder],
                             key=f"daskdist-state-of-{future.key}-{i}")
               for i, holder in enumerate(holders)]
    try:
        for reader in readers:
            try:
                state = reader.result(timeout=READ_BACK_TIMEOUT)
            except (TimeoutError, FutureCancelledError):  # its worker went away meanwhile
                state = None
            if state is not None:
                return state
        return None
    finally:
        for reader in readers:
            if reader.status == "pending":
                reader.release()


def kept_state(client, run_id: str, not_before: int) -> TrainingState | None:
    """The newest state (from round ``not_before`` on) that a live worker keeps, or None.

    Of one round, a state shared by every replica comes first, then replica
    0's, 1's ...
    """
    index = client.run(runtime.kept_index, run_id, on_error="return")
    candidates = sorted(
        ((r, replica, worker) for worker, items in index.items() if isinstance(items, list)
         for r, replica in items if r >= not_before),
        key=lambda c: (-c[0], c[1] != runtime.GLOBAL, c[1]))
    for r, replica, worker in candidates:
        found = client.run(runtime.kept_state, run_id, r, replica, workers=[worker],
                           on_error="return").get(worker)
        if isinstance(found, TrainingState):
            return found
    return None


def newest_state(trainer, not_before: int = 0) -> TrainingState | None:
    """Stop the rounds in flight; the newest state a round output or a worker still holds."""
    finished = [f for _, f in reversed(trainer.tracker.held()) if f.status == "finished"]
    trainer.cancel()  # frees the workers; ``finished`` keeps those results alive
    state = None
    for future in finished:
        state = read_state(trainer.client, future)
        if state is not None:
            break
    newer = kept_state(trainer.client, trainer.run_id,
                       not_before if state is None else state.round + 1)
    return newer if newer is not None else state


def replace_lost_shards(trainer) -> None:
    """Re-send shards whose data was lost with a worker; move replicas off dead workers."""
    trainer.wait_for_a_worker()
    live = trainer.live_workers()
    trainer.generation += 1
    for i, future in enumerate(trainer.shards):
        if trainer.replica_workers[i] not in live:
            trainer.replica_workers[i] = live[i % len(live)]
        if future.status in LOST:
            trainer.shards[i] = submit_shard(trainer, i, trainer.replica_workers[i])
    if trainer.spec_future.status in LOST:
        trainer.spec_future = trainer.submit_spec()


def submit_shard(trainer, index: int, worker: str):
    """Build shard ``index`` on ``worker`` again, from the data source."""
    if trainer.stream_chunks is not None:  # a streamed shard re-planned from others' chunks
        return trainer.shard_set.submit_chunks(trainer.client, index, trainer.stream_chunks[index],
                                               worker, run_id=trainer.key_prefix)
    recipe = trainer.recipes[index] if trainer.recipes is not None else None
    if recipe is None:
        return trainer.shard_set.submit(trainer.client, index, worker, run_id=trainer.key_prefix)
    client, prefix = trainer.client, f"{trainer.key_prefix}-for{index}"
    bases = {b: trainer.shard_set.submit(client, b, worker, run_id=prefix) for b in recipe.bases}
    parts, with_valid = [], set(recipe.valid)
    for k, (base, positions) in enumerate(recipe.parts):
        parts.append(client.submit(replan.rows_of, bases[base], positions, base in with_valid,
                                   key=(f"daskdist-rows-{prefix}", k), workers=[worker],
                                   allow_other_workers=True, pure=False))
        with_valid.discard(base)
    for k, base in enumerate(sorted(with_valid)):  # hold-outs of shards it took no rows from
        parts.append(client.submit(replan.rows_of, bases[base], slice(0, 0), True,
                                   key=(f"daskdist-rows-{prefix}-valid", k), workers=[worker],
                                   allow_other_workers=True, pure=False))
    return client.submit(replan.assemble, parts, index, recipe.remainder,
                         key=(f"daskdist-shard-{prefix}-rebuilt", index), workers=[worker],
                         allow_other_workers=True, pure=False)


def recover(trainer, lost, epoch_round: int, epoch_state: TrainingState) -> dict:
    """Continue the epoch from the newest state a live worker still holds; the record.

    Parameters
    ----------
    trainer : daskdist.driver.trainer.Trainer
    lost : daskdist.errors.WorkerLost
        What was lost (and, when the strategy knows, how many rounds).
    epoch_round : int
        The round the epoch started at.
    epoch_state : TrainingState
        The state the epoch started from (held by the client).
    """
    trainer.shard_losses.count(lost_shards(trainer.shards), shard_rows(trainer), str(lost))
    newest = trainer.tracker.newest_finished()
    state = newest_state(trainer, not_before=epoch_round)
    if state is None or state.round < epoch_round:
        state = epoch_state
    state = with_own_parts(trainer, state, epoch_state)
    rounds_lost = lost.rounds_lost
    if rounds_lost is None:
        rounds_lost = max((newest or state.round) - state.round, 0)
    record = {"epoch": trainer.epoch, "round": state.round, "rounds_lost": rounds_lost,
              "reason": str(lost)}
    logger.warning("daskdist run %s: %s; continuing epoch %d from round %d (%d finished "
                   "rounds lost)", trainer.run_id, lost, trainer.epoch, state.round,
                   rounds_lost)
    # states of the attempt given up, newer than this one, are not to be found again
    trainer.client.run(runtime.forget_from, trainer.run_id, state.round + 1,
                       on_error="ignore")
    replace_lost_shards(trainer)
    trainer.round = state.round
    trainer.set_state(state)
    return record


def _state_of(value):
    """The training state in a round's output (a strategy's round result or a state), or None.

    An overlapped round's result holds no state to continue from (its
    replica's parameters lack the newest averages): None.
    """
    state = getattr(value, "state", value)
    return state if isinstance(state, TrainingState) else None
