"""Round hooks: the states of settled rounds handed to whoever asked for every n-th one.

Round checkpoints (``Checkpoint(every_rounds=n)``) register ``(every, fn)``
in :attr:`Trainer.round_hooks <daskdist.driver.trainer.Trainer.round_hooks>`;
the tracker calls :func:`call` for each round output it settles.
"""

from __future__ import annotations

from . import own_parts, recovery

__all__ = ["call"]


def call(trainer, state_round: int, future) -> None:
    """Hand the state of a settled round to the ``trainer.round_hooks`` that want it."""
    wanted = [fn for every, fn in trainer.round_hooks if state_round % every == 0]
    if not wanted or state_round == trainer._epoch_state.round:
        return  # (the epoch's starting state was handed over at the epoch's end)
    state = recovery.read_state(trainer.client, future)
    if state is None or state.round != state_round:
        return  # gone with a worker: the next one will do
    state = own_parts.for_round_hook(trainer, state, trainer._epoch_state)
    if state is None:
        return
    for fn in wanted:
        fn(state)
