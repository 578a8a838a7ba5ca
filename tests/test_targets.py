"""Targets as skorch users give them: ``classes=`` in any order, ``classes=[]``, and module
outputs that must match the targets, each checked before any work reaches the cluster."""

from __future__ import annotations

import dask.array as da
import numpy as np
import pytest

from daskdist import MLP, DaskNeuralNetClassifier, DaskNeuralNetRegressor
from daskdist.state import params_vector
from daskdist.testing import TinyNet

# no scheduler listens here: an error raised before the fit contacts its cluster is the
# expected ValueError, one raised after would be a connection error
_NOWHERE = "tcp://127.0.0.1:9"


def _clf(**kwargs):
    params = dict(max_epochs=2, lr=0.2, batch_size=32, verbose=0, random_state=0,
                  train_split=None)
    return DaskNeuralNetClassifier(TinyNet, **{**params, **kwargs})


@pytest.mark.parametrize("kind", ["numpy", "dask"])
def test_classes_in_any_order_encode_labels_by_their_position(client, tiny_data, kind):
    X, y = tiny_data  # labels 0, 1, 2
    order = [2, 0, 1]
    Xin, yin = (da.from_array(X, chunks=150), da.from_array(y, chunks=150)) \
        if kind == "dask" else (X, y)
    net = _clf(classes=order).fit(Xin, yin)
    assert net.classes_.tolist() == order  # exactly as given
    # the same fit as one on targets that are already positions in the list
    positions = np.array([order.index(label) for label in y])
    if kind == "dask":  # the same shards as the fit above
        positions = da.from_array(positions, chunks=150)
        reference = _clf(classes=[0, 1, 2]).fit(Xin, positions)
    else:
        reference = _clf(classes=[0, 1, 2]).fit(X, positions)
    np.testing.assert_array_equal(params_vector(net.module_), params_vector(reference.module_))
    # column i of predict_proba is classes[i]; predict returns labels
    proba = net.predict_proba(X)
    np.testing.assert_array_equal(net.predict(X), np.asarray(order)[proba.argmax(axis=1)])
    assert (net.predict(X) == y).mean() > 0.6


def test_a_label_not_in_classes_is_refused_before_any_work(client, tiny_data):
    X, y = tiny_data
    for Xin, yin in [(X, y), (da.from_array(X, chunks=150), da.from_array(y, chunks=150))]:
        with pytest.raises(ValueError, match=r"labels \[2\] that are not in classes=\[1, 0\]"):
            _clf(classes=[1, 0], scheduler_address=_NOWHERE).fit(Xin, yin)
    with pytest.raises(ValueError, match="name each class once"):
        _clf(classes=[0, 1, 1, 2], scheduler_address=_NOWHERE).fit(X, y)


def test_empty_classes_mean_targets_are_class_indices_as_in_skorch(client, tiny_data):
    X, y = tiny_data
    net = _clf(classes=[]).fit(X, y)
    assert not hasattr(net, "classes_")
    predicted = net.predict(X)
    assert predicted.dtype.kind == "i" and set(np.unique(predicted)) <= {0, 1, 2}
    assert (predicted == y).mean() > 0.6
    with pytest.raises(ValueError, match="y holds class indices"):
        _clf(classes=[], scheduler_address=_NOWHERE).fit(X, np.array(["a", "b", "c"])[y])


def test_a_module_output_that_does_not_match_the_targets_is_refused(client, tiny_data):
    X, y = tiny_data
    with pytest.raises(ValueError, match="output has 5 columns, but y has 3 classes"):
        _clf(module__n_outputs=5, scheduler_address=_NOWHERE).fit(X, y)
    regressor = DaskNeuralNetRegressor(MLP, module__hidden=(8,), module__n_outputs=2,
                                       module__output="linear", max_epochs=1, verbose=0,
                                       scheduler_address=_NOWHERE)
    with pytest.raises(ValueError, match="output has 2 columns, but y has 1 target columns"):
        regressor.fit(X, y.astype(np.float32))
    two = np.stack([y, -y], axis=1).astype(np.float32)
    regressor.set_params(module__n_outputs=3)
    with pytest.raises(ValueError, match="output has 3 columns, but y has 2 target columns"):
        regressor.fit(X, two)
