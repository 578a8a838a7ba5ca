"""Replica agreement: the copies that are meant to be equal are compared once per epoch.

Under ``sync``, and ``local_sgd`` and ``hierarchical`` with compression, every
replica applies the same averaged update to its own copy of the parameters,
and only replica 0's copy ends the epoch. Anything that makes one worker
compute differently (a CPU fallback beside GPU workers, another CPU, another
thread count, an optimizer with side effects) would make the copies drift
apart unseen. So at the end of each epoch the driver has every worker
fingerprint the copies it holds of the epoch's last round
(:mod:`daskdist.worker.fingerprint`: 8 seeded projections, float64, a few
bytes per replica) and compares them: a relative mismatch above
:data:`DRIFT_TOLERANCE` warns with :class:`~daskdist.errors.ReplicaDriftWarning`
and is recorded (``rounds_["drift"]``, ``history[:, "replica_drift"]``).
Training goes on from replica 0's state, which every replica loads at the
start of the next epoch.
"""

from __future__ import annotations

import logging
import warnings

import numpy as np

from ..errors import ReplicaDriftWarning
from ..worker.fingerprint import replica_drift, replica_fingerprints

__all__ = ["DRIFT_TOLERANCE", "check_agreement"]

logger = logging.getLogger(__name__)

#: Relative mismatch of the replicas' fingerprints above which they have drifted.
DRIFT_TOLERANCE = 1e-5


def check_agreement(trainer, final) -> float | None:
    """Compare the replicas' copies at the epoch's last round; the drift, or None.

    None where the strategy keeps one shared state (nothing to compare) or
    where a copy could not be found (its worker is gone). A strategy whose
    own tasks compare their copies (``ddp``'s ranks) leaves the drift in the
    epoch's last round record, with the worst copy's worker.
    """
    logged = final.log[-1] if final.log else {}
    if "drift" in logged:
        drift, where = logged["drift"], logged.get("drift_worker")
    elif trainer.strategy.replica_copies and len(trainer.replica_workers) > 1:
        found = trainer.client.run(replica_fingerprints, trainer.run_id, final.round - 1,
                                   on_error="return")
        prints = {}
        for got in found.values():
            if isinstance(got, dict):
                prints.update(got)
        if sorted(prints) != list(range(len(trainer.replica_workers))):
            logger.debug("daskdist run %s: replica copies of round %d not all found (%s)",
                         trainer.run_id, final.round - 1, sorted(prints))
            return None
        drift = replica_drift(prints)
        worst = max(prints, key=lambda i: float(np.max(np.abs(prints[i] - prints[0]))))
        where = f"replica {worst} on {trainer.replica_workers[worst]}"
    else:
        return None
    if drift > DRIFT_TOLERANCE:
        warnings.warn(ReplicaDriftWarning(
            f"Replicas' copies of the parameters drifted apart in epoch {trainer.epoch}: "
            f"relative mismatch {drift:.3g} (above {DRIFT_TOLERANCE:g}), largest for {where}. "
            "Its worker computes the same update differently (another device or CPU, a CPU "
            "fallback, an optimizer with side effects); training goes on from replica 0's "
            "state."), stacklevel=2)
    return drift
