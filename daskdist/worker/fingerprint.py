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
#: Directions are drawn once and kept while they take at most this many bytes (one set, for
#: the last state layout fingerprinted); bigger states draw them again each time, a chunk at
#: a time.
CACHE_BYTES = 64 << 20
_cached: tuple | None = None  # (sizes of the parts, their directions)


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
    chunks = (part[start:start + _CHUNK] for part in parts
              for start in range(0, part.size, _CHUNK))
    for chunk, directions in zip(chunks, _directions(tuple(p.size for p in parts))):
        out += directions @ chunk.astype(np.float64)
    return out


def _directions(sizes: tuple):
    """The Gaussian directions of each chunk of parts of these sizes, in the order drawn.

    Kept for the next call where they fit in :data:`CACHE_BYTES`, so that a
    small model's fingerprint costs a product, not a draw of millions of
    normal numbers; otherwise drawn a chunk at a time.
    """
    global _cached
    found = _cached
    if found is not None and found[0] == sizes:
        return found[1]
    blocks = _draw(sizes)
    if sum(sizes) * N_PROJECTIONS * 8 <= CACHE_BYTES:
        blocks = list(blocks)
        _cached = (sizes, blocks)
    return blocks


def _draw(sizes: tuple):
    rng = np.random.default_rng(_SEED)
    for size in sizes:
        for start in range(0, size, _CHUNK):
            yield rng.standard_normal((N_PROJECTIONS, min(_CHUNK, size - start)))


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
