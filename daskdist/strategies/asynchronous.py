"""``async``: each replica's update is applied as soon as it arrives; no replica waits."""

from __future__ import annotations

from .parameter_server import ParameterServer

__all__ = ["Async"]


class Async(ParameterServer):
    """Asynchronous training with parameter-server semantics.

    Each replica runs ``sync_every`` local steps from the newest global
    parameters, sends the change it made, and starts its next round from the
    parameters with that change applied, without waiting for any other
    replica: the asynchronous data parallelism of Dean et al. 2012, "Large
    Scale Distributed Deep Networks" (Downpour SGD), with local steps between
    updates. A slow replica holds no one up; its updates arrive stale (other
    updates were applied since it started), and ``rounds_`` records by how
    much.

    Updates are scaled by their samples over those of the same round on
    every replica (about ``1 / n_replicas``), so a round of updates from
    replicas that started together adds up to their sample-weighted average
    (see :class:`~daskdist.strategies.ParameterServer`). An epoch ends once
    the updates applied cover the training set: fast replicas train on more
    of their shard than slow ones.

    Parameters
    ----------
    sync_every : int
        Local optimizer steps in each replica's round.
    """

    name = "async"

    def __init__(self, sync_every: int = 8):
        super().__init__(sync_every=sync_every, staleness=None)

    def get_params(self, deep: bool = False) -> dict:
        """The constructor arguments of this strategy."""
        return {"sync_every": self.sync_every}
