"""``fit(X, y, sample_weight=w)``: weighted losses on the workers, equal to weighted single-process
training, through scikit-learn's searches with metadata routing off and on."""

import dask.array as da
import numpy as np
import pytest
import sklearn
import torch
from sklearn.exceptions import UnsetMetadataPassedError
from sklearn.metrics import recall_score
from sklearn.model_selection import GridSearchCV

from daskdist import DaskNeuralNetClassifier
from daskdist.state import params_vector
from daskdist.testing import TinyNet


def _net(**kwargs):
    params = {**dict(max_epochs=3, lr=0.5, train_split=None, verbose=0, random_state=None,
                     sharding="sequential", n_replicas=2), **kwargs}
    torch.manual_seed(0)
    return DaskNeuralNetClassifier(TinyNet, **params)


def _close(a, b, atol=1e-5):
    np.testing.assert_allclose(params_vector(a.module_), params_vector(b.module_), atol=atol,
                               rtol=0)


def test_integer_weights_equal_rows_repeated_by_their_weight(client, tiny_data):
    X, y = tiny_data
    w = np.random.default_rng(0).integers(0, 4, len(X))
    weighted = _net(batch_size=len(X)).fit(X, y, sample_weight=w)
    repeated = _net(batch_size=int(w.sum())).fit(np.repeat(X, w, axis=0), np.repeat(y, w))
    _close(weighted, repeated)
    plain = _net(batch_size=len(X)).fit(X, y)
    assert not np.allclose(params_vector(weighted.module_), params_vector(plain.module_),
                           atol=1e-3)


@pytest.mark.parametrize("strategy", ["sync", "local_sgd", "hierarchical"])
def test_uniform_weights_equal_no_weights(client, tiny_data, strategy):
    X, y = tiny_data
    params = dict(strategy=strategy, sync_every=3, batch_size=32)
    if strategy == "hierarchical":
        params.update(n_replicas=4, strategy__groups=[[0, 1], [2, 3]])
    weighted = _net(**params).fit(X, y, sample_weight=np.full(len(X), 3.0))
    _close(weighted, _net(**params).fit(X, y))
    # weights are scaled to a mean of 1: rounds count weighted samples
    assert weighted.rounds_["samples"].sum() == pytest.approx(3 * len(X), abs=len(weighted.rounds_))


def test_zero_weights_on_one_class_drive_its_recall_down(client, tiny_data):
    X, y = tiny_data
    w = np.where(y == 0, 0.0, 1.0)
    plain = _net(max_epochs=10, batch_size=32).fit(X, y)
    weighted = _net(max_epochs=10, batch_size=32).fit(X, y, sample_weight=w)
    assert recall_score(y, plain.predict(X), labels=[0], average=None)[0] > 0.7
    assert recall_score(y, weighted.predict(X), labels=[0], average=None)[0] < 0.2


def test_a_batch_of_zero_weight_contributes_nothing(client, tiny_data):
    X, y = tiny_data
    # the second replica's shard weighs nothing: sync is the first replica's weighted steps
    w = np.r_[np.ones(len(X) // 2), np.zeros(len(X) - len(X) // 2)]
    both = _net(batch_size=32).fit(X, y, sample_weight=w)
    assert np.isfinite(params_vector(both.module_)).all()
    first = _net(batch_size=16, n_replicas=1).fit(X[:len(X) // 2], y[:len(X) // 2])
    _close(both, first)


def test_searches_route_sample_weight_with_routing_off_and_on(client, tiny_data):
    X, y = tiny_data
    w = np.where(y == 0, 0.0, 1.0)
    search = GridSearchCV(_net(max_epochs=10, batch_size=32), {"lr": [0.5]}, cv=2)
    search.fit(X, y, sample_weight=w)  # routing off (the default): passed to fit
    assert recall_score(y, search.predict(X), labels=[0], average=None)[0] < 0.2
    with sklearn.config_context(enable_metadata_routing=True):
        plain = GridSearchCV(_net(max_epochs=1, batch_size=32), {"lr": [0.5]}, cv=2)
        with pytest.raises(UnsetMetadataPassedError):  # routing is on: fit must request it
            plain.fit(X, y, sample_weight=w)
        net = (_net(max_epochs=10, batch_size=32).set_fit_request(sample_weight=True)
               .set_score_request(sample_weight=True))
        routed = GridSearchCV(net, {"lr": [0.5]}, cv=2).fit(X, y, sample_weight=w)
        assert recall_score(y, routed.predict(X), labels=[0], average=None)[0] < 0.2
        # scores weigh class 0 at zero: its misses do not count
        assert routed.best_score_ > 0.8


_BAD = [
    (np.ones(10), "one weight per sample"),
    (-np.ones(240), "240 negative values"),
    (np.r_[np.nan, np.ones(239)], "1 NaN or infinite"),
    (np.zeros(240), "zero for every sample"),
    (np.array(["a"] * 240), "must be numbers"),
    (da.ones(240, chunks=60), "dask array is not supported"),
]


@pytest.mark.parametrize("weights, message", _BAD, ids=[m for _, m in _BAD])
def test_bad_weights_are_refused_before_any_work(tiny_data, weights, message):
    X, y = tiny_data
    net = DaskNeuralNetClassifier(TinyNet, max_epochs=1, train_split=None, verbose=0,
                                  scheduler_address="tcp://127.0.0.1:1")
    with pytest.raises(ValueError, match=message):
        net.fit(X, y, sample_weight=weights)


@pytest.mark.parametrize("strategy", ["ddp", "pipeline"])
def test_strategies_that_plan_shares_from_row_counts_refuse_weights(tiny_data, strategy):
    X, y = tiny_data
    net = DaskNeuralNetClassifier(TinyNet, max_epochs=1, train_split=None, verbose=0,
                                  strategy=strategy, scheduler_address="tcp://127.0.0.1:1")
    with pytest.raises(ValueError, match="plans each step's shares"):
        net.fit(X, y, sample_weight=np.ones(len(X)))


def test_dask_inputs_refuse_weights(client, tiny_data):
    X, y = tiny_data
    with pytest.raises(ValueError, match="in-memory"):
        _net().fit(da.from_array(X, chunks=60), y, sample_weight=np.ones(len(X)))
