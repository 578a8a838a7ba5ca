"""torch Dataset inputs: ``fit(TensorDataset(X, y), None)`` and skorch's ``Dataset(X, y)``."""

import numpy as np
import pytest
import torch
from skorch.dataset import Dataset as SkorchDataset
from torch.utils.data import IterableDataset, TensorDataset

from daskdist import DaskNeuralNetClassifier
from daskdist.state import params_vector
from daskdist.testing import TinyNet


def _net(**kwargs):
    return DaskNeuralNetClassifier(TinyNet, max_epochs=2, lr=0.5, batch_size=32, verbose=0,
                                   random_state=0, **kwargs)


def _same_fit(a, b):
    np.testing.assert_array_equal(params_vector(a.module_), params_vector(b.module_))


def test_in_memory_datasets_train_as_their_arrays(client, tiny_data):
    X, y = tiny_data
    arrays = _net().fit(X, y)
    tensors = _net().fit(TensorDataset(torch.from_numpy(X), torch.from_numpy(y)), None)
    _same_fit(tensors, arrays)
    _same_fit(_net().fit(TensorDataset(torch.from_numpy(X)), y), arrays)
    _same_fit(_net().fit(SkorchDataset(X, y), None), arrays)
    np.testing.assert_array_equal(tensors.classes_, arrays.classes_)
    # and predict on a dataset (its targets, if any, are not needed)
    expected = arrays.predict_proba(X)
    np.testing.assert_array_equal(tensors.predict_proba(TensorDataset(torch.from_numpy(X))),
                                  expected)
    np.testing.assert_array_equal(
        tensors.predict(TensorDataset(torch.from_numpy(X), torch.from_numpy(y))),
        arrays.predict(X))


class _Stream(IterableDataset):
    def __iter__(self):
        yield from ()


def test_datasets_it_cannot_shard_are_refused_with_the_reason(tiny_data):
    X, y = tiny_data
    net = _net(scheduler_address="tcp://127.0.0.1:1")
    with pytest.raises(ValueError, match="no length or index"):
        net.fit(_Stream(), None)
    with pytest.raises(ValueError, match="y is given twice"):
        net.fit(TensorDataset(torch.from_numpy(X), torch.from_numpy(y)), y)
    with pytest.raises(ValueError, match="holds no targets"):
        net.fit(TensorDataset(torch.from_numpy(X)), None)
