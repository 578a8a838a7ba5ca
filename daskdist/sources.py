"""Sources: where training data comes from, and how it becomes shards.

A source answers two questions on the client without loading the features —
how many samples there are, and (when asked) what the labels are — and knows
how to put each planned shard on the worker that will train it:

- :class:`NumpySource` sends each shard's rows once, straight to its worker.
  Dask cannot recompute scattered data, so the source keeps what it needs to
  send a shard again (:meth:`Source.submit_shard` with another worker).
- :class:`DaskArraySource` selects each shard's rows from the chunks where
  they are (``daskdist-take`` tasks, one per chunk and shard) and assembles the
  shard on its worker. The client never computes the array, and a lost shard
  is recomputed from lineage.

xarray, Zarr and dataframe inputs are sources of the same shape.
"""

from __future__ import annotations

import abc
import logging

import dask
import dask.array as da
import numpy as np

from .shards import RawShard, make_shard

logger = logging.getLogger(__name__)

__all__ = ["Source", "NumpySource", "DaskArraySource", "as_source"]


class Source(abc.ABC):
    """Training data that can be planned on the client and sharded onto workers."""

    #: True when the features live in a Dask graph rather than in client memory.
    lazy = False

    def __init__(self, X, y=None):
        if y is not None and len(y) != X.shape[0]:
            raise ValueError(
                f"X has {X.shape[0]} samples but y has {len(y)}; they must match."
            )
        self.X = X
        self.y = y

    @property
    def n_samples(self) -> int:
        """Number of samples."""
        return int(self.X.shape[0])

    @abc.abstractmethod
    def labels(self) -> np.ndarray | None:
        """The targets as a numpy array (computed for lazy sources)."""

    def prepare(self, client, plan, *, run_id: str) -> None:  # noqa: B027 - optional hook
        """Submit whatever the shards of ``plan`` share (lazy sources)."""

    @abc.abstractmethod
    def _raw(self, client, index: int, rows: np.ndarray, worker: str, valid_positions):
        """Return a future (or list of futures) of the :class:`RawShard`."""

    def submit_shard(self, client, index: int, rows: np.ndarray, worker: str, *,
                     run_id: str, valid_positions=None, **shard_kwargs):
        """Put shard ``index`` (the given rows) on ``worker``; return its future.

        The shard is built by a ``daskdist-shard`` task pinned to ``worker``
        that may run elsewhere if the worker is gone.
        """
        raw = self._raw(client, index, rows, worker, valid_positions)
        return client.submit(
            make_shard, raw, replica=index, **shard_kwargs,
            key=f"daskdist-shard-{run_id}-{index}",
            workers=[worker], allow_other_workers=True, pure=False,
        )


#: Seconds to wait for the chosen worker before sending a shard to another one.
_SCATTER_WAIT = 5


class NumpySource(Source):
    """Features and targets held in client memory (numpy arrays)."""

    def __init__(self, X, y=None, *, direct: bool = True):
        super().__init__(np.asarray(X) if not hasattr(X, "shape") else X,
                         None if y is None else np.asarray(y))
        self.direct = direct

    def labels(self):
        return self.y

    def _raw(self, client, index, rows, worker, valid_positions):
        raw = RawShard(self.X[rows], None if self.y is None else self.y[rows], valid_positions)
        try:
            return client.scatter(raw, workers=[worker], direct=self.direct, hash=False,
                                  timeout=_SCATTER_WAIT)
        except (TimeoutError, OSError):
            # The worker died since it was chosen: any live worker will do; the
            # shard task follows its data.
            logger.info("worker %s is gone; sending shard %d to another worker", worker, index)
            return client.scatter(raw, direct=self.direct, hash=False)


class DaskArraySource(Source):
    """Features (and optionally targets) in dask arrays chunked along samples."""

    lazy = True

    def __init__(self, X, y=None):
        if any(np.isnan(c) for c in X.chunks[0]):
            raise ValueError(
                "X has unknown chunk sizes along the sample axis; call "
                "X.compute_chunk_sizes() first."
            )
        X = X.rechunk({i: -1 for i in range(1, X.ndim)})
        if y is not None:
            y = _along_samples(y, X.chunks[0])
        super().__init__(X, y)
        self._labels = None
        self._pieces = None

    def labels(self):
        # Only the targets travel to the client (stratified plans need them).
        if self.y is None:
            return None
        if self._labels is None:
            self._labels = self.y.compute()
        return self._labels

    def prepare(self, client, plan, *, run_id):
        bounds = np.concatenate([[0], np.cumsum(self.X.chunks[0])]).astype(np.int64)
        x_chunks = self.X.to_delayed().ravel()
        y_chunks = (self.y.to_delayed().ravel() if self.y is not None
                    else [None] * len(x_chunks))
        pieces, owners = [], []
        for index, rows in enumerate(plan):
            for c in range(len(x_chunks)):
                lo, hi = np.searchsorted(rows, [bounds[c], bounds[c + 1]])
                if hi > lo:
                    local = rows[lo:hi] - bounds[c]
                    pieces.append(dask.delayed(_take_rows)(
                        x_chunks[c], y_chunks[c], local,
                        dask_key_name=f"daskdist-take-{run_id}-{index}-{c}"))
                    owners.append(index)
        futures = client.compute(pieces)
        self._pieces = {i: [f for f, o in zip(futures, owners) if o == i] for i in range(len(plan))}

    def _raw(self, client, index, rows, worker, valid_positions):
        if not np.all(rows[:-1] <= rows[1:]):
            raise ValueError("Shards of a dask array must list rows in increasing order.")
        return self._pieces[index]


def _take_rows(x_chunk, y_chunk, local):
    y = None if y_chunk is None else np.asarray(y_chunk)[local]
    return RawShard(np.asarray(x_chunk)[local], y)


def _along_samples(a, sample_chunks) -> da.Array:
    """``a`` as a dask array chunked like the samples, whole along other axes."""
    chunks = (sample_chunks,) + (-1,) * (np.ndim(a) - 1)
    if isinstance(a, da.Array):
        return a.rechunk(chunks)
    return da.from_array(np.asarray(a), chunks=chunks)


def as_source(X, y=None, *, direct: bool = True) -> Source:
    """Wrap ``X`` (and ``y``) in the matching :class:`Source`.

    Parameters
    ----------
    X : numpy.ndarray or dask.array.Array
        Features, samples along the first axis.
    y : array-like, optional
        Targets.
    direct : bool
        Send numpy shards straight from the client to their workers.
    """
    if isinstance(X, Source):
        return X
    if isinstance(X, da.Array):
        return DaskArraySource(X, y)
    if isinstance(y, da.Array):
        return DaskArraySource(_along_samples(X, y.chunks[0]), y)
    if hasattr(X, "shape") and hasattr(X, "__getitem__"):
        return NumpySource(X, y, direct=direct)
    raise TypeError(
        f"daskdist cannot train on X of type {type(X).__name__}; pass a numpy array or a "
        "dask array (xarray, Zarr and dataframes are read through dask)."
    )
