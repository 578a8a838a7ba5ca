"""Input checks, made on the client before any work reaches the cluster.

In-memory inputs are checked in full (finite values, shapes, label types).
Dask inputs are checked from their metadata first, then by one pass over the
data on the workers (:func:`scan_dask_values`) that finds non-finite values —
naming the chunk that holds them — and the global classes at once; the client
never computes the features.
"""

from __future__ import annotations

import dask
import dask.array as da
import numpy as np
from sklearn.utils.multiclass import check_classification_targets, type_of_target
from sklearn.utils.validation import check_array, column_or_1d

__all__ = ["check_features", "check_targets", "check_sample_weight", "scan_dask_values"]


def _is_dask(a) -> bool:
    return isinstance(a, da.Array)


def check_features(X, *, n_features=None, what: str = "X", estimator: str = "the estimator"):
    """Validate features; return numpy floats as float32, anything else as it is.

    Integer and boolean features keep their type here: the workers convert
    every shard (and prediction its input) with
    :func:`daskdist.data.shards.feature_dtype`, for NumPy and dask inputs alike.

    Parameters
    ----------
    X : array-like or dask.array.Array
        Samples along the first axis.
    n_features : int, optional
        The number of features seen in fit; a mismatch is an error.
    what : str
        Name used in error messages.
    estimator : str
        Name of the estimator, for error messages.
    """
    if X is None:
        raise ValueError(f"{what} is None; pass an array of samples.")
    if _is_dask(X):
        if X.ndim < 2:
            raise ValueError(
                f"Expected a 2-d {what} (samples, features) or more dims, got a {X.ndim}-d "
                "dask array; reshape it with X.reshape(-1, 1) for a single feature."
            )
        if X.dtype.kind not in "biuf":
            raise ValueError(f"{what} must hold numbers, got dtype {X.dtype}.")
    else:
        if hasattr(X, "dtype") and np.issubdtype(np.asarray(X).dtype, np.complexfloating):
            raise ValueError(f"Complex data not supported in {what}.")
        X = check_array(X, allow_nd=True, dtype="numeric", ensure_all_finite=True,
                        input_name=what)
        if X.dtype.kind == "f":
            X = X.astype(np.float32, copy=False)
    if n_features is not None and X.ndim == 2 and X.shape[1] != n_features:
        raise ValueError(
            f"{what} has {X.shape[1]} features, but {estimator} is expecting {n_features} "
            "features as input (as many as in fit)."
        )
    return X


def check_targets(y, *, classifier: bool, n_samples: int):
    """Validate targets.

    Returns
    -------
    y : numpy.ndarray or dask.array.Array
        Classifier targets unchanged (labels are encoded on the workers);
        regression targets as float32.
    """
    if y is None:
        raise ValueError("This estimator requires y to be passed, but the target y is None.")
    if _is_dask(y):
        if y.shape[0] != n_samples:
            raise ValueError(f"X has {n_samples} samples but y has {y.shape[0]}.")
        if not classifier and not np.issubdtype(y.dtype, np.number):
            raise ValueError(f"Regression targets must be numbers, got dtype {y.dtype}.")
        return y if classifier else y.astype(np.float32)
    y = np.asarray(y)
    if y.ndim == 0:
        raise ValueError(f"y must hold one target per sample, got the scalar {y!r}.")
    if y.shape[0] != n_samples:
        raise ValueError(f"X has {n_samples} samples but y has {y.shape[0]}.")
    if classifier:
        if y.ndim == 2 and y.shape[1] == 1:
            y = column_or_1d(y, warn=True)
        check_classification_targets(y)
        if type_of_target(y) not in ("binary", "multiclass"):
            raise ValueError(f"Expected class labels, got targets of type {type_of_target(y)}.")
        if y.dtype.kind == "f" and not np.all(np.isfinite(y)):
            raise ValueError("y contains NaN or infinity.")
        return y
    y = check_array(y, ensure_2d=False, dtype="numeric", ensure_all_finite=True,
                    input_name="y")
    return y.astype(np.float32, copy=False)


def check_sample_weight(sample_weight, *, n_samples: int) -> np.ndarray:
    """Validate ``fit``'s ``sample_weight``; return it as float64, scaled to a mean of 1.

    A weighted loss is a weighted mean, so the scale of the weights changes
    nothing but what ``rounds_`` counts as samples: scaled to a mean of 1,
    a round's weight reads as its number of (weighted) samples.

    Raises
    ------
    ValueError
        For weights that are not one finite, non-negative number per sample,
        or that are all zero; dask arrays are refused (weights travel with
        in-memory shards).
    """
    if _is_dask(sample_weight):
        raise ValueError("sample_weight as a dask array is not supported: pass a numpy array "
                         "(one weight per row travels with each in-memory shard).")
    w = np.asarray(sample_weight)
    if w.ndim == 0:
        w = np.full(n_samples, float(w))
    if w.ndim != 1 or len(w) != n_samples:
        raise ValueError(f"sample_weight must hold one weight per sample: X has {n_samples} "
                         f"samples, sample_weight has shape {w.shape}.")
    if w.dtype.kind not in "biuf":
        raise ValueError(f"sample_weight must be numbers, got dtype {w.dtype}.")
    w = w.astype(np.float64)
    if not np.isfinite(w).all():
        raise ValueError(f"sample_weight has {int((~np.isfinite(w)).sum())} NaN or infinite "
                         "values.")
    if (w < 0).any():
        raise ValueError(f"sample_weight has {int((w < 0).sum())} negative values; weights "
                         "must be >= 0.")
    if not w.sum() > 0:
        raise ValueError("sample_weight is zero for every sample: nothing would be learnt.")
    return w * (n_samples / w.sum())


def scan_dask_values(X, y=None, *, classifier: bool = False):
    """One pass over dask inputs: non-finite values per chunk, and the classes.

    Parameters
    ----------
    X : dask.array.Array
        Features, chunked along samples.
    y : dask.array.Array, optional
        Targets: their classes are found (classifiers) or their values
        checked (regressors) in the same pass.
    classifier : bool
        Whether ``y`` holds class labels.

    Returns
    -------
    numpy.ndarray or None
        The sorted classes of ``y`` for classifiers, else None.

    Raises
    ------
    ValueError
        Naming the first chunk (and its sample range) with NaN or infinity.
    """
    checks = {"X": _chunk_flags(X)}
    if isinstance(y, da.Array) and not classifier and y.dtype.kind in "fc":
        checks["y"] = _chunk_flags(y)
    classes = da.unique(y) if isinstance(y, da.Array) and classifier else None
    flags, classes = dask.compute(checks, classes)
    for what, bad in flags.items():
        if bad.any():
            chunk = int(np.flatnonzero(bad)[0])
            starts = np.concatenate([[0], np.cumsum((X if what == "X" else y).chunks[0])])
            raise ValueError(
                f"{what} contains NaN or infinity in chunk {chunk} of {len(bad)} along the "
                f"samples (samples {starts[chunk]} to {starts[chunk + 1] - 1}); drop or fill "
                "those values before training.")
    return None if classes is None else np.asarray(classes)


def _chunk_flags(a: da.Array) -> da.Array:
    """One bool per chunk along axis 0: does it hold a non-finite value?"""
    a = a.rechunk({i: -1 for i in range(1, a.ndim)})
    return a.map_blocks(_nonfinite, drop_axis=list(range(1, a.ndim)) or None,
                        chunks=((1,) * a.numblocks[0],), dtype=bool,
                        meta=np.empty((0,), dtype=bool), token="daskdist-check-finite")


def _nonfinite(block: np.ndarray) -> np.ndarray:
    block = np.asarray(block)
    if block.dtype.kind not in "fc":
        return np.zeros(1, dtype=bool)
    return np.array([not np.isfinite(block).all()])
