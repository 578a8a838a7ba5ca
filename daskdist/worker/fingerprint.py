"""A replica's state in a few numbers: seeded random projections, to compare replicas cheaply.

Where every replica applies the same update to its own copy of the
parameters (``sync``; ``local_sgd`` and ``hierarchical`` with compression),
the copies must stay equal. Comparing them in full would move every copy;
instead each worker projects its replicas' parameters and floating-point
buffers onto :data:`N_PROJECTIONS` Gaussian directions drawn from a fixed
seed (in float64), and the driver compares the few numbers
(:mod:`daskdist.driver.agreement`). Two equal copies give equal
fingerprints; copies that differ by ``d`` differ in their fingerprints by
about ``|d|`` (a Johnson-Lindenstrauss sketch), so a relative mismatch of
the fingerprints measures the drift.
"""

from __future__ import annotations

import numpy as np

from .runtime import GLOBAL, kept_items

__all__ = ["N_PROJECTIONS", "fingerprint", "fingerprint_of", "replica_drift",
           "replica_fingerprints"]

#: Directions each state is projected on.
N_PROJECTIONS = 8
_SEED = 20_231_108
_CHUNK = 1 << 20  # entries of one direction drawn at a time (bounded memory for big models)


def fingerprint(state) -> np.ndarray:
    """``N_PROJECTIONS`` seeded Gaussian projections of the state's parameters and buffers.

    Float64; the same directions on every worker and for every state of the
    same size.
    """
    return fingerprint_of(state.params, state.buffers)


def fingerprint_of(params: np.ndarray, buffers: dict) -> np.ndarray:
    """:func:`fingerprint` of a flat parameter vector and a dict of buffers."""
    parts = [np.asarray(params).ravel()]
    for name in sorted(buffers):
        value = np.asarray(buffers[name])
        if value.dtype.kind == "f":
            parts.append(value.ravel())
    out = np.zeros(N_PROJECTIONS)
    rng = np.random.default_rng(_SEED)
    for part in parts:
        values = part.astype(np.float64)
        for start in range(0, values.size, _CHUNK):
            chunk = values[start:start + _CHUNK]
            out += rng.standard_normal((N_PROJECTIONS, chunk.size)) @ chunk
    return out


def replica_drift(prints: dict) -> float:
    """The largest relative mismatch of each replica's fingerprint from replica 0's.

    ``prints`` maps replica (or rank) index to fingerprint; the mismatch of
    ``i`` is ``max|f_i - f_0| / max|f_0|``, ``0`` the smallest index.
    """
    reference = prints[min(prints)]
    scale = max(float(np.max(np.abs(reference))), np.finfo(np.float64).tiny)
    return max(float(np.max(np.abs(f - reference))) / scale for f in prints.values())


def replica_fingerprints(run_id: str, round: int) -> dict[int, np.ndarray]:
    """Fingerprints of the replicas' own copies this worker keeps at ``round`` (run on workers).

    Round results that hold a replica's own state (a ``sync`` step, a
    compressed ``local_sgd`` round) are kept by the worker that made them
    (:mod:`daskdist.worker.runtime`); those of this fit at ``round`` are
    fingerprinted, by replica.
    """
    found = {}
    for replica, value in kept_items(run_id, round):
        state = getattr(value, "state", None)
        if replica != GLOBAL and state is not None:
            found[replica] = fingerprint(state)
    return found
