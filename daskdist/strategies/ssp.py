"""``ssp``: stale-synchronous parallel, replicas at most ``staleness`` rounds apart."""

from __future__ import annotations

from .parameter_server import ParameterServer

__all__ = ["SSP"]


class SSP(ParameterServer):
    """Stale-synchronous parallel training: asynchronous, with a bound on drift.

    Implements the stale synchronous parallel model of Ho et al. 2013, "More
    Effective Distributed ML via a Stale Synchronous Parallel Parameter
    Server". Updates are applied as they arrive, as in
    :class:`~daskdist.strategies.Async`, but a replica may start a round only
    while it is at most ``staleness`` rounds ahead of the slowest replica;
    otherwise it waits for that one. A transient straggler costs the others
    nothing as long as it catches up within the bound; a persistent one sets
    the pace, as in synchronous training. ``staleness=0`` makes every replica
    wait for all others at every round: the updates of a round then add up to
    their sample-weighted average, as with ``local_sgd``.

    Parameters
    ----------
    sync_every : int
        Local optimizer steps in each replica's round.
    staleness : int
        Rounds a replica may run ahead of the slowest one.
    """

    name = "ssp"

    def __init__(self, sync_every: int = 8, staleness: int = 2):
        super().__init__(sync_every=sync_every, staleness=staleness)

    def validate(self) -> None:
        if self.staleness is None:
            raise ValueError("ssp needs a staleness bound (an integer >= 0); for no bound "
                             "use strategy='async'.")
        super().validate()
