"""What replicas keep of their own, as the driver sees it: gathered into the training state.

Round tasks keep each replica's (or group's) own part — ``topk`` residuals,
its own optimizer state, its fp16 loss scaler — on its worker
(:mod:`daskdist.worker.own_state`). The driver reads the parts back where a
state must stand on its own: at the end of each epoch (:func:`at_epoch_end`:
the next epoch and checkpoints start from it), for round checkpoints
(:func:`for_round_hook`), and after a lost worker (:func:`with_own_parts`).
"""

from __future__ import annotations

import logging
from dataclasses import replace

from ..state import TrainingState
from ..worker import own_state

__all__ = ["gather_own", "with_own_parts", "at_epoch_end", "for_round_hook"]

logger = logging.getLogger(__name__)


def gather_own(trainer, round: int) -> tuple[dict, list[str]]:
    """The parts replicas (and groups) kept after ``round``, by owner; the owners not found.

    Parts that hold nothing are left out of the dict (not of the check).
    """
    owners = trainer.strategy.owners(list(trainer.replica_workers))
    found = trainer.client.run(own_state.parts_at, trainer.run_id, round, owners,
                               on_error="return")
    parts = {}
    for got in found.values():
        if isinstance(got, dict):
            parts.update(got)
    missing = [owner for owner in owners if owner not in parts]
    return ({owner: part for owner, part in sorted(parts.items())
             if not own_state.is_empty(part)}, missing)


def with_own_parts(trainer, state: TrainingState, epoch_state: TrainingState) -> TrainingState:
    """``state`` with every replica's own part, or the epoch's start if one was lost.

    A part missing (its worker was lost) is harmless when every part found
    holds nothing and the epoch started with none: replicas of one fit keep
    the same kinds of things, so the lost one held nothing either.
    """
    if state is epoch_state or state.round == epoch_state.round:
        return epoch_state
    own, missing = gather_own(trainer, state.round - 1)
    if missing and (own or epoch_state.own):
        logger.warning("daskdist run %s: what %s kept of its own at round %d was lost with "
                       "its worker; continuing from the epoch's start (round %d) so that "
                       "training stays exact", trainer.run_id, ", ".join(missing), state.round,
                       epoch_state.round)
        return epoch_state
    return replace(state, own=own)


def at_epoch_end(trainer, final: TrainingState) -> TrainingState:
    """The epoch's final state with what each replica keeps of its own (if anything).

    The state on the client carries the parts (for checkpoints, and for a
    recovery that goes back to the epoch's start); the next epoch's rounds
    find them where they are, on the replicas' workers, so nothing more
    crosses the network. A part lost with a worker at this point starts
    afresh in the next epoch (with a warning).
    """
    own, missing = gather_own(trainer, final.round - 1)
    if not own:
        return final
    if missing:
        logger.warning("daskdist run %s: what %s kept of its own at the end of epoch %d was "
                       "lost with its worker; they start the next epoch afresh",
                       trainer.run_id, ", ".join(missing), trainer.epoch)
    return replace(final, own=own)


def for_round_hook(trainer, state: TrainingState, epoch_state: TrainingState):
    """``state`` (of a settled round) with the replicas' parts, or None where one is gone.

    A state without a part that held something would not resume exactly, so
    a round whose parts are gone (with a worker, or replaced by newer
    rounds') is handed to no hook.
    """
    own, missing = gather_own(trainer, state.round - 1)
    if missing and (own or epoch_state.own):
        logger.debug("daskdist run %s: round %d handed to no hook (parts of %s gone)",
                     trainer.run_id, state.round, ", ".join(missing))
        return None
    return replace(state, own=own)
