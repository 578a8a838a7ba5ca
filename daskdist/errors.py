"""The exceptions a fit raises, and those that steer the driver.

Control flow between the workers, the strategies and the driver goes through
these classes only: a strategy reports a lost worker by raising
:class:`WorkerLost` (``EpochContext.lost`` does), a replica task whose
starting state is gone raises :class:`StateLost`, and the driver answers both
with a recovery (:mod:`daskdist.driver.recovery`). :class:`NonFiniteError`,
:class:`ShardFailedError` and :class:`GroupAborted` reach the user.
"""

from __future__ import annotations

__all__ = ["WorkerLost", "StateLost", "StagesLost", "NonFiniteError", "ShardFailedError",
           "GroupAborted", "ReplicaDriftWarning"]


class WorkerLost(Exception):
    """A round's inputs were lost with a worker and cannot be recomputed.

    Raised inside an epoch; the driver recovers (continues from the newest
    state a live worker holds) up to ``daskdist.driver.recoveries`` times per
    epoch.

    Parameters
    ----------
    reason : str
        What was lost, for the ``recoveries_`` table and the log.
    rounds_lost : int, optional
        Finished rounds that will run again, when the strategy knows (one
        that runs an epoch's steps inside long tasks, as ``ddp`` does); None
        lets the driver count them from the round outputs it held.
    """

    def __init__(self, reason: str, rounds_lost: int | None = None):
        super().__init__(reason)
        self.reason = reason
        self.rounds_lost = rounds_lost


class StateLost(RuntimeError):
    """A round's starting state is gone with the worker that held it.

    Raised on a worker by a replica task; the driver treats it as a lost
    worker (:class:`WorkerLost`).
    """


class StagesLost(RuntimeError):
    """A pipeline stage that keeps the only copy of its state is gone.

    Raised by the stages of a fit built on its workers
    (``strategy__build="workers"``) when a stage is gone and neither its
    initial values (the first epoch) nor a sharded checkpoint of the epoch's
    start can rebuild it: the driver cannot recover; it reaches the user,
    who resumes from the fit's last sharded checkpoint.
    """


class NonFiniteError(FloatingPointError):
    """Too many replica updates were not finite.

    A replica whose loss, parameters or gradient become NaN or infinite in a
    round contributes nothing to that round (its update is skipped and the
    round log names it); the fit fails with this error once more than
    ``daskdist.driver.max-non-finite`` updates were skipped. The global
    parameters stay those of the last finite round.
    """


class ShardFailedError(RuntimeError):
    """The tasks of one shard killed every worker they ran on (a poison shard).

    Raised instead of retrying for ever: when Dask gives up on a task of the
    shard (:class:`distributed.KilledWorker`, chained as the cause) or when
    the workers that held the shard died more times in a row than
    ``distributed.scheduler.allowed-failures``. ``replica`` is the shard's index.
    """

    def __init__(self, message: str, replica: int | None):
        super().__init__(message)
        self.replica = replica


class GroupAborted(RuntimeError):
    """The driver gave up the epoch of a ``ddp`` process group; its ranks stop."""


class ReplicaDriftWarning(UserWarning):
    """Replicas meant to hold equal parameters hold different ones.

    Warned at the end of an epoch where the fingerprints of the replicas'
    copies differ by more than a relative 1e-5
    (:mod:`daskdist.driver.agreement`); training goes on from replica 0's
    state.
    """
