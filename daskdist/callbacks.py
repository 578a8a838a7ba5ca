"""Epoch callbacks that belong to daskdist."""

from __future__ import annotations

from skorch.callbacks import Callback

__all__ = ["Checkpoint"]


class Checkpoint(Callback):
    """Save a safetensors checkpoint every ``every`` epochs and when training ends.

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
    at_train_end : bool
        Also save when training ends. After Ctrl-C the last epoch-end
        checkpoint is kept: a fit resumes at an epoch boundary.
    """

    def __init__(self, dirname="checkpoint", every: int = 1, at_train_end: bool = True):
        self.dirname = dirname
        self.every = every
        self.at_train_end = at_train_end

    def initialize(self):
        if not isinstance(self.every, int) or isinstance(self.every, bool) or self.every < 1:
            raise ValueError(f"every must be a positive integer, got {self.every!r}.")
        self._saved_epoch = None
        return self

    def on_epoch_end(self, net, **kwargs):
        epochs = len(net.history)
        if epochs % self.every == 0:
            net.save_checkpoint(self.dirname)
            self._saved_epoch = epochs

    def on_train_end(self, net, **kwargs):
        if not self.at_train_end or self._saved_epoch == len(net.history):
            return
        if len(net.history) and "train_loss" not in net.history[-1]:
            return  # interrupted mid-epoch: keep the last epoch-end checkpoint
        net.save_checkpoint(self.dirname)
