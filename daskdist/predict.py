"""Prediction: in memory on the client, over dask arrays block by block.

Block-wise as dask-ml's ``ParallelPostFit``.

:class:`Predicting` is the estimators' side of it (mixed into
:class:`~daskdist.net.DaskNet`).

The per-block function is module-level so it pickles cleanly; the fitted
predictor enters the graph once, as a delayed object shared by every block, so
the result is computed by whatever scheduler is current — also after the
cluster used for training has closed.

Every forward pass of a prediction sees the same number of rows
(:func:`pad_rows`): a short last batch is filled up with copies of its own
rows, and their outputs are dropped (:func:`take_rows`). BLAS libraries pick
their matrix-multiply kernel by the matrix's shape, and kernels for different
shapes sum in different orders (MKL's single-row path differs from its
many-row one in the last bit of float32, measured here; on other CPUs the
threshold sits elsewhere). Without the padding, a row's prediction would
depend on how many rows shared its batch, so on the row's position in the
input and on the chunking of a dask array.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Mapping

import dask
import dask.array as da
import numpy as np
import torch
from skorch.dataset import unpack_data
from skorch.utils import to_device

from .data.indexed import ConvertedDataset, reads_by_index
from .data.inputs import Labels, to_arrays
from .data.named import check_named, each, is_named
from .data.shards import apply_preprocessor, feature_dtype, takes_indices
from .data.torch_datasets import unpack_dataset
from .data.validation import check_features
from .worker.devices import is_cuda

__all__ = ["predict_blocks", "pad_rows", "take_rows", "skorch_device", "Predicting"]


def _leaves(batch):
    if isinstance(batch, Mapping):
        return [leaf for value in batch.values() for leaf in _leaves(value)]
    if isinstance(batch, (tuple, list)):
        return [leaf for value in batch for leaf in _leaves(value)]
    return [batch]


def _map_rows(batch, fn):
    if isinstance(batch, Mapping):
        return type(batch)((k, _map_rows(v, fn)) for k, v in batch.items())
    if isinstance(batch, (tuple, list)):
        return type(batch)(_map_rows(v, fn) for v in batch)
    return fn(batch)


def pad_rows(batch, rows: int):
    """Fill a batch of inputs up to ``rows`` rows with copies of its own rows.

    Parameters
    ----------
    batch : torch.Tensor, or a dict, tuple or list of them
        One batch of model inputs, samples along the first axis.
    rows : int
        The number of rows every batch of a prediction has.

    Returns
    -------
    padded : same type as ``batch``
        ``batch`` itself when it has ``rows`` rows or more, or when it holds
        anything but tensors of one length; else every tensor with its rows
        repeated cyclically up to ``rows``.
    n : int or None
        The real rows, for :func:`take_rows`; None when nothing was padded.
    """
    leaves = _leaves(batch)
    if not all(isinstance(t, torch.Tensor) and t.ndim >= 1 for t in leaves):
        return batch, None
    lengths = {len(t) for t in leaves}
    if len(lengths) != 1:
        return batch, None
    (n,) = lengths
    if n == 0 or n >= rows:
        return batch, None
    index = torch.arange(rows) % n
    return _map_rows(batch, lambda t: t.index_select(0, index.to(t.device))), n


def take_rows(output, n: int | None, rows: int):
    """Drop the outputs of the padding rows that :func:`pad_rows` added.

    Tensors (also inside tuples, lists and dicts) of ``rows`` rows are cut to
    their first ``n``; anything else, a scalar auxiliary output for example,
    is returned as it is.
    """
    if n is None:
        return output
    return _map_rows(output, lambda t: t[:n] if isinstance(t, torch.Tensor) and t.ndim >= 1
                     and len(t) == rows else t)


def _predict_block(block, predictor, method):
    if block.shape[0] == 0:  # keep the output's trailing shape for empty blocks
        return getattr(predictor, method)(np.zeros((1,) + block.shape[1:], block.dtype))[:0]
    return getattr(predictor, method)(block)


def predict_blocks(predictor, X: da.Array, method: str, *, out_shape: tuple, dtype) -> da.Array:
    """Apply ``predictor.<method>`` to every block of ``X`` along samples.

    Parameters
    ----------
    predictor : object
        A picklable object with the method (a fitted estimator without live
        cluster handles).
    X : dask.array.Array
        Samples along axis 0.
    method : str
        ``"predict"`` or ``"predict_proba"``.
    out_shape : tuple
        Shape of one sample's output (``()`` for one value per sample).
    dtype : numpy dtype
        Output dtype.
    """
    X = X.rechunk({i: -1 for i in range(1, X.ndim)})
    shared = dask.delayed(predictor, pure=True, traverse=False)
    name = f"daskdist-predict-{method.replace('_', '-')}"
    if out_shape:
        chunks = (X.chunks[0],) + tuple((d,) for d in out_shape)
        new_axis = list(range(1, 1 + len(out_shape))) if X.ndim == 1 else None
        drop_axis = list(range(1 + len(out_shape), X.ndim)) or None
        return da.map_blocks(_predict_block, X, shared, method, dtype=dtype, chunks=chunks,
                             new_axis=new_axis, drop_axis=drop_axis, token=name,
                             meta=np.empty((0,) * len(chunks), dtype=dtype))
    return da.map_blocks(_predict_block, X, shared, method, dtype=dtype,
                         chunks=(X.chunks[0],), drop_axis=list(range(1, X.ndim)), token=name,
                         meta=np.empty((0,), dtype=dtype))


@contextlib.contextmanager
def skorch_device(net, follow_module: bool = False):
    """Run skorch's own code in this process on a device it has.

    ``device`` names where the workers train. Here skorch's initialisation
    uses the CPU when ``device`` is a GPU this process does not have (a
    client without one); with ``follow_module`` (prediction here) it works
    where the module is.
    """
    requested, here = net.device, None
    if follow_module and getattr(net, "module_", None) is not None:
        params = [p for p in net.module_.parameters()
                  if not isinstance(p, torch.nn.parameter.UninitializedParameter)]
        here = params[0].device if params else None
    if here is None and is_cuda(requested) and not torch.cuda.is_available():
        here = torch.device("cpu")
    if here is None or str(here) == str(requested):
        yield
        return
    net.device = str(here)
    try:
        yield
    finally:
        net.device = requested


class Predicting:
    """Prediction of a :class:`~daskdist.net.DaskNet`: here for numpy, block-wise for dask."""

    def _predict_input(self, X):
        """``(X as an array, labels for the output)``; see :mod:`daskdist.data.inputs`."""
        if not hasattr(self, "n_features_in_"):
            from sklearn.exceptions import NotFittedError

            raise NotFittedError(f"This {type(self).__name__} instance is not fitted yet.")
        X, _ = unpack_dataset(X, predicting=True)
        if reads_by_index(X):  # read here, through iterator_valid, as skorch reads it
            return ConvertedDataset(X, index_features=takes_indices(self.module_)), Labels()
        if is_named(X):
            return check_named(X, keys=getattr(self, "input_keys_", None)), Labels()
        features = self.features or getattr(self, "input_features_", None)
        X, _, labels = to_arrays(X, sample_dim=self.sample_dim, features=features)
        labels = dataclasses.replace(labels, name=labels.name or getattr(self, "target_name_",
                                                                         None))
        X = check_features(X, n_features=self.n_features_in_, estimator=type(self).__name__)
        return X, labels

    def forward_iter(self, X, training=False, device="cpu"):
        """Yield the module's outputs batch by batch, every forward pass of one shape.

        As skorch's ``forward_iter``, but a short last batch is filled up
        to the batch size with copies of its own rows and their outputs are
        dropped (:func:`daskdist.predict.pad_rows`), so that a row's output
        does not depend on how many rows shared its batch. With
        ``iterator_valid__batch_size=-1`` (one batch of everything) there is
        no fixed shape and nothing is padded.
        """
        dataset = self.get_dataset(X)
        rows = self.get_params_for("iterator_valid").get("batch_size", self.batch_size)
        for batch in self.get_iterator(dataset, training=training):
            Xi, yi = unpack_data(batch)
            Xi, n = pad_rows(Xi, rows) if rows and rows > 0 else (Xi, None)
            yp = self.evaluation_step((Xi, yi), training=training)
            yield to_device(take_rows(yp, n, rows), device=device)

    def _local_proba(self, X):
        """Module output for in-memory ``X`` on the client (preprocessed here).

        A model held in its pipeline stages (``strategy__build="workers"``)
        computes it there.
        """
        staged = self._held_in_stages()
        if isinstance(X, ConvertedDataset):
            if staged:
                raise ValueError("A model held in its pipeline stages predicts arrays; read "
                                 "the Dataset into an array first.")
            with skorch_device(self, follow_module=True):
                return self._skorch_base.predict_proba(self, X)
        if not is_named(X):
            X = np.asarray(apply_preprocessor(self.preprocessor, X))
        indices = takes_indices(self.module_)

        def convert(a):
            a = np.asarray(a)
            a = a.astype(feature_dtype(a.dtype, index_features=indices), copy=False)
            return a if a.flags.writeable else a.copy()  # pandas and xarray: read-only views

        X = each(X, convert)
        if staged:
            return self._staged_output(X)
        with skorch_device(self, follow_module=True):
            return self._skorch_base.predict_proba(self, X)

    def _blockwise(self, X, method, out_shape, dtype):
        if self._held_in_stages():
            return self._staged_blockwise(X, method, out_shape, dtype)
        # The fitted estimator itself enters the graph: it pickles without live handles.
        return predict_blocks(self, X, method, out_shape=out_shape, dtype=dtype)
