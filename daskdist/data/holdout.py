"""The hold-out: which rows of each shard are kept for validation.

One rule (:func:`holdout_split`) decides, wherever it runs: on the client
when the labels are in its memory already (a numpy input,
:func:`client_holdout`), or on the worker that builds the shard (a dask
input, whose labels stay on the workers; per chunk for streamed shards).
The seed of shard ``i`` is ``random_state + i`` either way.
"""

from __future__ import annotations

import numpy as np

__all__ = ["holdout_split", "client_holdout"]


def holdout_split(n_samples: int, fraction: float, *, labels=None, random_state=None):
    """Split ``range(n_samples)`` into train and hold-out positions.

    Parameters
    ----------
    n_samples : int
        Samples in the shard.
    fraction : float
        Share of samples held out, in (0, 1).
    labels : array-like, optional
        If given, the hold-out keeps class proportions (each class keeps at
        least one training sample).
    random_state : int or None
        Seed.

    Returns
    -------
    train, valid : numpy.ndarray
        Sorted positions into the shard.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"The hold-out fraction must be in (0, 1), got {fraction}.")
    rng = np.random.default_rng(random_state)
    if labels is None:
        perm = rng.permutation(n_samples)
        n_valid = int(round(n_samples * fraction))
        n_valid = min(max(n_valid, 1 if n_samples > 1 else 0), n_samples - 1)
        return np.sort(perm[n_valid:]), np.sort(perm[:n_valid])
    labels = np.asarray(labels)
    train, valid = [], []
    for cls in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == cls))
        n_valid = min(int(round(len(members) * fraction)), len(members) - 1)
        valid.append(members[:n_valid])
        train.append(members[n_valid:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(valid))


def client_holdout(plan, fraction: float, *, labels=None, random_state: int = 0):
    """The hold-out positions of each shard of ``plan``, chosen on the client.

    ``labels`` (all of the source's, when the hold-out is stratified) are
    indexed by each shard's rows.
    """
    return [holdout_split(len(rows), fraction,
                          labels=None if labels is None else labels[rows],
                          random_state=random_state + i)[1]
            for i, rows in enumerate(plan)]
