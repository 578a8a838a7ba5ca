"""Callbacks that belong to daskdist: safetensors checkpoints, gradient clipping by value."""

from __future__ import annotations

from skorch.callbacks import Callback
from torch.nn.utils import clip_grad_value_

__all__ = ["Checkpoint", "GradientValueClipping"]


class Checkpoint(Callback):
    """Save a safetensors checkpoint every ``every`` epochs (or rounds) and at the end.

    The pickle-free counterpart of skorch's ``Checkpoint``: parameters,
    buffers and optimizer state go to a safetensors file, counters, history
    and the estimator's JSON-representable parameters to a JSON sidecar (see
    :mod:`daskdist.checkpoint`). Each save replaces the previous one
    atomically. Resume with ``net.fit(X, y, resume=dirname)``.

    Parameters
    ----------
    dirname : str or os.PathLike
        The checkpoint directory.
    every : int
        Save after every ``every``-th epoch (counted over the whole run).
    every_rounds : int or None
        Also save, during an epoch, the state of every ``every_rounds``-th
        synchronisation round (counted over the whole run) as soon as the
        driver sees it finish; a fit resumed from it continues with the next
        round. Each save fetches the state from a worker (its size in bytes)
        and writes it while the workers go on with the following rounds.
    at_train_end : bool
        Also save when training ends. After Ctrl-C in the middle of an epoch
        this saves the last finished round, and a fit resumed from it goes on
        with the next round.
    """

    def __init__(self, dirname="checkpoint", every: int = 1, every_rounds: int | None = None,
                 at_train_end: bool = True):
        self.dirname = dirname
        self.every = every
        self.every_rounds = every_rounds
        self.at_train_end = at_train_end

    def initialize(self):
        _check_positive("every", self.every)
        if self.every_rounds is not None:
            _check_positive("every_rounds", self.every_rounds)
        self._saved_epoch = None
        return self

    def save_round(self, net, state) -> None:
        """Save the state of a round finished during an epoch (see ``every_rounds``)."""
        net.save_checkpoint(self.dirname, state=state)

    def on_epoch_end(self, net, **kwargs):
        epochs = len(net.history)
        if epochs % self.every == 0:
            net.save_checkpoint(self.dirname)
            self._saved_epoch = epochs

    def on_train_end(self, net, **kwargs):
        if not self.at_train_end or self._saved_epoch == len(net.history):
            return
        # After Ctrl-C mid-epoch the net holds the last finished round's state, and
        # its checkpoint resumes with the round after it.
        net.save_checkpoint(self.dirname)


def _check_positive(name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}.")


class GradientValueClipping(Callback):
    """Clip every gradient entry to ``[-gradient_clip_value, gradient_clip_value]``.

    The by-value counterpart of skorch's ``GradientNormClipping``
    (:func:`torch.nn.utils.clip_grad_value_`). In a plain skorch net it acts in
    ``on_grad_computed``; in a daskdist estimator each replica clips the
    gradient of every step on its worker (the averaged gradient under
    ``sync`` and ``ddp``), see docs/skorch.md.

    Parameters
    ----------
    gradient_clip_value : float or None
        The largest absolute value a gradient entry keeps; None: no clipping.
    """

    def __init__(self, gradient_clip_value=None):
        self.gradient_clip_value = gradient_clip_value

    def on_grad_computed(self, net, named_parameters, **kwargs):
        if self.gradient_clip_value is not None:
            clip_grad_value_([p for _, p in named_parameters], self.gradient_clip_value)
