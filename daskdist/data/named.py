"""Dict inputs: named arrays of the same samples, sharded, batched and predicted together.

``X = {"image": images, "meta": table}`` trains a module whose
``forward(image, meta)`` takes those names, as in skorch: every array holds
the samples along its first axis, shards take the same rows of each, and
every batch calls ``module(**batch)``. The helpers here let the rest of the
data layer treat a dict and a single array alike.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

__all__ = ["is_named", "n_rows", "take", "each", "leaves", "call", "check_named"]


def is_named(X) -> bool:
    """Whether ``X`` is a dict of named arrays.

    A plain ``dict``: an xarray Dataset is a mapping too, and scipy's DOK
    sparse matrix is a dict with a shape.
    """
    return isinstance(X, dict) and not hasattr(X, "shape")


def n_rows(X) -> int:
    """Samples in ``X`` (an array, or a dict of arrays)."""
    if is_named(X):
        return len(next(iter(X.values())))
    return int(X.shape[0]) if hasattr(X, "shape") else len(X)


def take(X, rows):
    """The rows ``rows`` (an index array, mask or slice) of ``X``, of each array of a dict."""
    if is_named(X):
        return {key: value[rows] for key, value in X.items()}
    return X[rows]


def each(X, fn):
    """``fn`` applied to ``X``, or to each array of a dict (a dict again)."""
    if is_named(X):
        return {key: fn(value) for key, value in X.items()}
    return fn(X)


def leaves(X) -> list:
    """The arrays of ``X``: itself, or a dict's values."""
    return list(X.values()) if is_named(X) else [X]


def call(module, X):
    """``module(X)``, or ``module(**X)`` for a dict."""
    return module(**X) if is_named(X) else module(X)


def check_named(X: Mapping, *, keys=None) -> dict:
    """Validate a dict input; return it as a dict of numpy arrays.

    Parameters
    ----------
    X : mapping of str to array-like
        Named arrays with the same number of samples.
    keys : iterable of str, optional
        The names seen in fit: prediction must bring the same.

    Raises
    ------
    ValueError
        For an empty dict, names that are not strings, dask arrays, arrays
        of different lengths, non-numeric or non-finite values, or names
        other than those seen in fit.
    """
    if not X:
        raise ValueError("X is an empty dict: give at least one named array.")
    out = {}
    for key, value in X.items():
        if not isinstance(key, str):
            raise ValueError(f"The names of a dict X must be strings (forward's arguments), "
                             f"got {key!r}.")
        if type(value).__module__.startswith("dask"):
            raise ValueError(f"X[{key!r}] is a dask array: dict inputs are in-memory (numpy) "
                             "arrays for now.")
        array = np.asarray(value)
        if array.ndim == 0:
            raise ValueError(f"X[{key!r}] is a scalar; each value needs samples along its "
                             "first axis.")
        if array.dtype.kind not in "biuf":
            raise ValueError(f"X[{key!r}] has dtype {array.dtype}; features must be numbers.")
        if array.dtype.kind == "f" and not np.isfinite(array).all():
            raise ValueError(f"X[{key!r}] contains NaN or infinity.")
        out[key] = array
    lengths = {key: len(value) for key, value in out.items()}
    if len(set(lengths.values())) != 1:
        raise ValueError(f"The arrays of a dict X must have the same number of samples, got "
                         f"{lengths}.")
    if keys is not None and sorted(out) != sorted(keys):
        raise ValueError(f"X has the names {sorted(out)}, but the estimator was fitted on "
                         f"{sorted(keys)}.")
    return out
