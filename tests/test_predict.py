"""Predictions: a row's output does not depend on where it sits in the input."""

import dask.array as da
import numpy as np
import pytest
import torch

from daskdist import MLP, DaskNeuralNetClassifier, DaskNeuralNetRegressor
from daskdist.predict import pad_rows, take_rows
from daskdist.testing import make_classification

COMMON = dict(module__hidden=(32,), max_epochs=2, lr=0.05, batch_size=16, verbose=0,
              random_state=0)


@pytest.fixture(scope="module")
def fitted(session_client):
    X, y = make_classification(n_samples=120, n_features=20)
    with session_client.as_current():
        clf = DaskNeuralNetClassifier(MLP, **COMMON).fit(X, y)
        reg = DaskNeuralNetRegressor(MLP, module__output="linear", **COMMON).fit(
            X, X[:, :2].sum(1))
    return X, {"classifier": clf, "regressor": reg}


@pytest.mark.parametrize("kind", ["classifier", "regressor"])
def test_a_rows_prediction_is_the_same_alone_reordered_and_in_any_chunking(fitted, kind,
                                                                           client):
    # Without fixed-shape batches a row alone takes MKL's single-row kernel, whose float32
    # sums differ in the last bit from the many-row kernel's; sklearn's sample-order check
    # fails on such differences.
    X, nets = fitted
    net = nets[kind]
    whole = net.predict_proba(X)
    alone = np.concatenate([net.predict_proba(X[i:i + 1]) for i in range(0, len(X), 7)])
    np.testing.assert_array_equal(alone, whole[::7])
    order = np.random.default_rng(1).permutation(len(X))
    np.testing.assert_array_equal(net.predict_proba(X[order]), whole[order])
    for chunks in (1, 5, 37):
        np.testing.assert_array_equal(net.predict_proba(da.from_array(X, chunks=chunks)).compute(),
                                      whole)
    np.testing.assert_array_equal(net.predict(X[order]), net.predict(X)[order])


def test_padding_repeats_a_batchs_own_rows_and_is_dropped_from_the_output():
    batch = {"a": torch.arange(6.0).reshape(3, 2), "b": (torch.tensor([1, 2, 3]),)}
    padded, n = pad_rows(batch, 8)
    assert n == 3 and padded["a"].shape == (8, 2)
    assert padded["b"][0].tolist() == [1, 2, 3, 1, 2, 3, 1, 2]
    out = (padded["a"] * 2, torch.tensor(0.5))
    cut = take_rows(out, n, 8)
    assert torch.equal(cut[0], batch["a"] * 2) and cut[1].item() == 0.5
    full = torch.ones(8, 2)
    assert pad_rows(full, 8) == (full, None) and take_rows(full, None, 8) is full
    ragged = (torch.ones(3), torch.ones(4))
    assert pad_rows(ragged, 8) == (ragged, None)
