"""torch ``Dataset`` inputs: in-memory ones are sharded as the arrays they hold.

skorch users write ``net.fit(TensorDataset(X, y), None)`` or pass skorch's own
``Dataset(X, y)``; both hold their samples in memory, so daskdist takes their
arrays out and shards them like NumPy input (``y=None`` as in skorch). Other
map-style datasets read their samples by index (from files, say): they pass
through, to be read on the workers (:mod:`daskdist.data.indexed`). An
``IterableDataset`` is refused with the reason, before any work.
"""

from __future__ import annotations

import numpy as np
import torch
from skorch.dataset import Dataset as SkorchDataset
from torch.utils.data import Dataset, IterableDataset, TensorDataset

__all__ = ["unpack_dataset"]


def _array(value):
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    if isinstance(value, dict):
        return {key: _array(v) for key, v in value.items()}
    return value


def unpack_dataset(X, y=None, *, predicting: bool = False):
    """``(X, y)`` of an in-memory dataset's arrays; other inputs (and datasets) as they are.

    Parameters
    ----------
    X : torch.utils.data.Dataset or anything else
        ``TensorDataset(X)`` or ``TensorDataset(X, y)``, or skorch's
        ``Dataset(X, y)``.
    y : array-like, optional
        Targets beside a dataset that holds none.
    predicting : bool
        The dataset's targets, if any, are dropped (prediction needs ``X``).

    Raises
    ------
    ValueError
        For targets given twice or missing, and for an ``IterableDataset``.
    """
    if not isinstance(X, Dataset):
        return X, y
    name = type(X).__name__
    if isinstance(X, IterableDataset):
        raise ValueError(f"{name} is an IterableDataset: it has no length or index to cut "
                         "into shards. Pass arrays, a dask array, or a map-style dataset.")
    if isinstance(X, TensorDataset):
        tensors = [_array(t) for t in X.tensors]
        if len(tensors) > 2:
            raise ValueError(f"A TensorDataset of {len(tensors)} tensors: daskdist takes "
                             "(features,) or (features, targets).")
        data_X, data_y = tensors[0], tensors[1] if len(tensors) == 2 else None
    elif isinstance(X, SkorchDataset):
        data_X, data_y = _array(X.X), _array(X.y)
    else:  # read by index, on the workers
        return X, y
    if predicting:
        return data_X, None
    if data_y is not None and y is not None:
        raise ValueError(f"y is given twice: inside the {name} and as fit's y; pass y=None.")
    if data_y is None and y is None:
        raise ValueError(f"The {name} holds no targets: pass fit(dataset, y), or a dataset "
                         "of (features, targets).")
    return data_X, np.asarray(data_y) if data_y is not None else y
