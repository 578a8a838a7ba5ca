"""Prediction over dask arrays, block by block, as dask-ml's ``ParallelPostFit``.

The per-block function is module-level so it pickles cleanly; the fitted
predictor enters the graph once, as a delayed object shared by every block, so
the result is computed by whatever scheduler is current — also after the
cluster used for training has closed.
"""

from __future__ import annotations

import dask
import dask.array as da
import numpy as np

__all__ = ["predict_blocks"]


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
