"""Shards: the part of the data one replica trains on, held on its worker.

:func:`make_shard` runs on the worker as a ``daskdist-shard`` task. It applies
the optional preprocessing step, converts dtypes for torch and splits off the
hold-out used for validation. The result is a :class:`Shard` that stays in the
worker's memory for the rest of the fit.

A shard's arrays start on a 64-byte boundary, also after the shard was sent to
another worker: torch's CPU kernels round differently depending on how their
inputs are aligned, and a shard rebuilt or moved after a worker was lost must
train exactly as the original did.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .holdout import holdout_split
from .named import each, is_named, leaves, n_rows, take

__all__ = ["Shard", "RawShard", "make_shard", "convert_rows", "apply_preprocessor", "aligned",
           "feature_dtype", "takes_indices",
           "aligned_empty"]

#: Byte boundary every shard array starts on.
ALIGNMENT = 64


def aligned_empty(shape, dtype) -> np.ndarray:
    """An uninitialised C-contiguous array starting on an :data:`ALIGNMENT`-byte boundary."""
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    buffer = np.empty(nbytes + ALIGNMENT, dtype=np.uint8)
    start = (-buffer.ctypes.data) % ALIGNMENT
    return buffer[start:start + nbytes].view(dtype).reshape(shape)


def aligned(a: np.ndarray | None) -> np.ndarray | None:
    """``a`` as a C-contiguous array starting on an :data:`ALIGNMENT`-byte boundary.

    Returned as it is when it already is one; otherwise copied once.
    """
    if a is None or (a.flags.c_contiguous and a.ctypes.data % ALIGNMENT == 0):
        return a
    out = aligned_empty(a.shape, a.dtype)
    out[...] = a
    return out


@dataclass
class RawShard:
    """Rows of the source selected for one shard, before preprocessing."""

    X: np.ndarray
    y: np.ndarray | None
    valid_positions: np.ndarray | None = None  # hold-out chosen on the client
    w: np.ndarray | None = None  # sample weights


@dataclass
class Shard:
    """A replica's training rows and hold-out rows, ready for torch."""

    X: np.ndarray
    y: np.ndarray | None
    X_valid: np.ndarray
    y_valid: np.ndarray | None
    replica: int
    w: np.ndarray | None = None  # sample weights of the training rows (None: unweighted)
    #: Rows an epoch interrupted by a change of replicas has left (``plan.EpochRemainder``).
    remainder: object = None

    def __post_init__(self):
        for name in ("X", "y", "X_valid", "y_valid", "w"):
            value = getattr(self, name)
            setattr(self, name, None if value is None else each(value, aligned))

    def __setstate__(self, state: dict) -> None:
        # Arrays unpickled from a message sit wherever the message put them.
        self.__dict__.update(state)
        self.__post_init__()

    def __len__(self) -> int:
        return n_rows(self.X)

    @property
    def n_valid(self) -> int:
        """Number of hold-out samples."""
        return n_rows(self.X_valid)

    def __sizeof__(self) -> int:
        # what Dask's memory accounting and task placement see (dask.sizeof)
        arrays = [*leaves(self.X), self.y, *leaves(self.X_valid), self.y_valid, self.w]
        return object.__sizeof__(self) + sum(a.nbytes for a in arrays if a is not None)

    def batches(self, plan):
        """``(X, y)`` tensors of each step of a round (:class:`~daskdist.worker.replica.RoundPlan`).

        Stops early once the epoch has used up the shard.
        """
        for positions in plan.positions(len(self), self.remainder):
            if len(positions) == 0:
                return
            yield self.batch(positions)

    def weighted_batches(self, plan):
        """``(X, y, w)`` of each step of a round; ``w`` (a tensor) is None when unweighted."""
        for positions in plan.positions(len(self), self.remainder):
            if len(positions) == 0:
                return
            X, y = self.batch(positions)
            yield X, y, None if self.w is None else torch.from_numpy(self.w[positions])

    def batch(self, positions: np.ndarray):
        """Return ``(X, y)`` tensors for the given training positions.

        A run of consecutive positions (unshuffled training) is a view, not a copy.
        """
        if len(positions) > 1 and np.all(np.diff(positions) == 1):
            positions = slice(int(positions[0]), int(positions[-1]) + 1)
        X = each(take(self.X, positions), torch.from_numpy)
        y = None if self.y is None else torch.from_numpy(self.y[positions])
        return X, y


def apply_preprocessor(preprocessor, X):
    """Apply a fitted transformer (``.transform``) or a callable to ``X``.

    In-memory ``X`` is copied first: some transformers (dask-ml's scalers
    among them) work in place on numpy input, which would change the
    caller's array and preprocess it twice when it is used again.
    """
    if preprocessor is None:
        return X
    if isinstance(X, np.ndarray):
        X = X.copy()
    if hasattr(preprocessor, "transform"):
        return preprocessor.transform(X)
    return preprocessor(X)


def takes_indices(module: torch.nn.Module) -> bool:
    """Whether ``module`` starts with an embedding, so integer features are indices.

    The first submodule (in registration order) that holds parameters of its
    own decides: ``nn.Embedding`` or ``nn.EmbeddingBag``.
    """
    for sub in module.modules():
        if next(sub.parameters(recurse=False), None) is not None:
            return isinstance(sub, (torch.nn.Embedding, torch.nn.EmbeddingBag))
    return False


def feature_dtype(dtype, *, x_dtype=np.float32, index_features: bool = False) -> np.dtype:
    """The dtype features of ``dtype`` reach the module in.

    Floating features become ``x_dtype`` (the module's float type). Integer
    and boolean features become ``x_dtype`` as well, as scikit-learn
    estimators take them, whether they come as NumPy or dask arrays, xarray
    or dataframes; with ``index_features`` (a module that starts with an
    embedding, :func:`takes_indices`) they become int64 indices instead.
    """
    kind = np.dtype(dtype).kind
    if index_features and kind in "biu":
        return np.dtype(np.int64)
    return np.dtype(x_dtype)


def make_shard(raw: RawShard | list, *, replica: int, preprocessor=None, x_dtype=np.float32,
               index_features: bool = False, classes=None, y_dtype=None, y_2d: bool = False,
               holdout: float | None = None, stratify: bool = False, seed: int = 0) -> Shard:
    """Build a :class:`Shard` on the worker.

    Parameters
    ----------
    raw : RawShard or list of RawShard
        The shard's rows (pieces from several chunks are concatenated).
    replica : int
        Index of the replica that trains this shard.
    preprocessor : transformer or callable, optional
        Applied to the features of the shard (training and hold-out rows).
    x_dtype, y_dtype : numpy dtype
        Dtypes the module expects; ``y_dtype=None`` keeps ``y`` as it is.
    index_features : bool
        Integer features stay integers (int64) for an embedding; see
        :func:`feature_dtype`.
    classes : numpy.ndarray, optional
        Class labels in output-column order (any order); ``y`` is replaced by each
        label's position in it.
    y_2d : bool
        Reshape a 1-d ``y`` to one column (regression on one target).
    holdout : float or None
        Fraction of the shard held out for validation, when the client did
        not choose the rows itself (``raw.valid_positions is None``).
    stratify : bool
        Keep class proportions in the hold-out.
    seed : int
        Seed of the hold-out split.
    """
    if isinstance(raw, list):
        raw = RawShard(np.concatenate([p.X for p in raw]),
                       None if raw[0].y is None else np.concatenate([p.y for p in raw]),
                       w=None if raw[0].w is None else np.concatenate([p.w for p in raw]))
    w = None if raw.w is None else np.asarray(raw.w, dtype=np.float32)
    X, y = convert_rows(raw.X, raw.y, preprocessor=preprocessor, x_dtype=x_dtype,
                        index_features=index_features, classes=classes, y_dtype=y_dtype,
                        y_2d=y_2d)
    valid = raw.valid_positions
    if valid is None and holdout:
        _, valid = holdout_split(n_rows(X), holdout, labels=y if stratify else None,
                                 random_state=seed)
    if valid is None or len(valid) == 0:
        empty = take(X, slice(0, 0))
        return Shard(X, y, empty, None if y is None else y[:0], replica, w)  # Shard aligns them
    mask = np.ones(n_rows(X), dtype=bool)
    mask[valid] = False
    return Shard(X=take(X, mask), y=None if y is None else y[mask], X_valid=take(X, valid),
                 y_valid=None if y is None else y[valid], replica=replica,
                 w=None if w is None else w[mask])


def convert_rows(X, y, *, preprocessor=None, x_dtype=np.float32, index_features: bool = False,
                 classes=None, y_dtype=None, y_2d: bool = False):
    """Preprocess features and convert features and targets to what the module expects.

    Parameters
    ----------
    X : numpy.ndarray
        Raw feature rows.
    y : numpy.ndarray or None
        Raw targets of the same rows.
    preprocessor, x_dtype, index_features, classes, y_dtype, y_2d
        As in :func:`make_shard`.

    Returns
    -------
    X, y : numpy.ndarray
    """
    if is_named(X):  # a dict input: each array converted on its own (no preprocessor)
        X = each(X, np.asarray)
    else:
        X = np.asarray(apply_preprocessor(preprocessor, X))
    if x_dtype is not None:
        X = each(X, lambda a: a.astype(feature_dtype(a.dtype, x_dtype=x_dtype,
                                                     index_features=index_features), copy=False))
    if y is not None:
        if classes is not None:  # each label's position in classes (given in any order)
            order = np.argsort(classes, kind="stable")
            y = order[np.searchsorted(classes, y, sorter=order)]
        if y_dtype is not None:
            y = np.asarray(y).astype(y_dtype, copy=False)
        if y_2d and y.ndim == 1:
            y = y.reshape(-1, 1)
    return X, y
