"""The estimators behave as scikit-learn and skorch users expect."""

import pickle

import dask.array as da
import numpy as np
import pytest
import torch
from distributed import Client
from sklearn.base import clone
from sklearn.model_selection import GridSearchCV, StratifiedKFold
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from skorch.callbacks import BatchScoring, EarlyStopping, EpochScoring, LRScheduler
from torch.optim.lr_scheduler import ReduceLROnPlateau

from daskdist import MLP, DaskNeuralNetClassifier, DaskNeuralNetRegressor
from daskdist.state import params_vector
from daskdist.testing import TinyNet, make_classification


def _clf(**kwargs):
    params = dict(max_epochs=3, lr=0.2, batch_size=32, verbose=0, random_state=0)
    params.update(kwargs)
    return DaskNeuralNetClassifier(TinyNet, **params)


def test_fit_records_history_and_rounds(client, tiny_data):
    X, y = tiny_data
    net = _clf(strategy="local_sgd", sync_every=2).fit(X, y)
    row = net.history[-1]
    for key in ("train_loss", "valid_loss", "valid_acc", "dur", "rounds", "samples_per_sec"):
        assert key in row, key
    assert len(net.history) == 3
    assert net.history[-1, "train_loss"] < net.history[0, "train_loss"]
    assert list(net.rounds_.columns) == ["round", "epoch", "replicas", "skipped", "samples", "loss",
                                         "bytes", "sync_s", "compute_s", "staleness", "dropped",
                                         "drift", "n_replicas", "membership",
                                         "replica_compute_s", "activation_bytes"]
    assert len(net.rounds_) == sum(net.history[:, "rounds"])
    assert net.rounds_["round"].tolist() == list(range(len(net.rounds_)))
    assert (net.rounds_["compute_s"] > 0).all() and (net.rounds_["sync_s"] >= 0).all()
    assert net.score(X, y) > 0.5


def test_string_labels_round_trip(client, tiny_data):
    X, y = tiny_data
    labels = np.array(["cat", "dog", "emu"])[y]
    net = _clf(max_epochs=2).fit(X, labels)
    assert list(net.classes_) == ["cat", "dog", "emu"]
    assert set(net.predict(X)) <= {"cat", "dog", "emu"}
    assert net.predict_proba(X).shape == (len(X), 3)


def test_predict_on_dask_returns_dask_and_matches_numpy(client, tiny_data):
    X, y = tiny_data
    net = _clf(max_epochs=2).fit(X, y)
    Xd = da.from_array(X, chunks=50)
    proba = net.predict_proba(Xd)
    labels = net.predict(Xd)
    assert isinstance(proba, da.Array) and isinstance(labels, da.Array)
    assert proba.shape == (len(X), 3)
    assert any("daskdist-predict" in str(k) for k in dict(labels.__dask_graph__()))
    np.testing.assert_allclose(proba.compute(), net.predict_proba(X), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(labels.compute(), net.predict(X))


def test_pickle_round_trip_gives_a_working_predictor(client, tiny_data):
    X, y = tiny_data
    net = _clf(max_epochs=2).fit(X, y)
    loaded = pickle.loads(pickle.dumps(net))
    np.testing.assert_array_equal(loaded.predict(X), net.predict(X))
    np.testing.assert_array_equal(params_vector(loaded.module_), params_vector(net.module_))


def test_clone_and_params(client):
    net = _clf(strategy="local_sgd", sync_every=5, strategy__sync_every=3, sharding="stratified")
    params = net.get_params()
    for key in ("strategy", "sync_every", "sharding", "n_replicas", "scheduler_address",
                "random_state", "preprocessor", "strategy__sync_every"):
        assert key in params, key
    twin = clone(net)
    assert twin.get_params()["strategy__sync_every"] == 3
    assert twin.sync_every == 5 and twin.sharding == "stratified"
    twin.set_params(sync_every=7, strategy="sync")
    assert twin.sync_every == 7 and twin.strategy == "sync"
    # strategy__* wins over the top-level sync_every
    assert net.get_strategy().sync_every == 3


def test_strategy_options_are_validated_before_any_work(client, tiny_data):
    X, y = tiny_data
    with pytest.raises(ValueError, match="no option 'staleness'"):
        _clf(strategy="local_sgd", strategy__staleness=2).fit(X, y)
    with pytest.raises(ValueError, match="Unknown strategy"):
        _clf(strategy="allreduce").fit(X, y)
    with pytest.raises(ValueError, match="sync_every must be a positive integer"):
        _clf(strategy="local_sgd", sync_every=0).fit(X, y)


def test_strategy_object_and_its_attributes(client, tiny_data):
    from daskdist import LocalSGD

    X, y = tiny_data
    strategy = LocalSGD(sync_every=4)
    net = _clf(strategy=strategy, strategy__sync_every=2, max_epochs=1).fit(X, y)
    assert strategy.sync_every == 4  # the user's object is not changed
    assert net.history[-1, "rounds"] == 3  # 96 samples per shard, 16 per step: 6 steps / 2


def test_inside_a_pipeline_with_a_scaler(client, tiny_data):
    X, y = tiny_data
    pipe = Pipeline([("scale", StandardScaler()), ("net", _clf(max_epochs=4))])
    pipe.fit(X * 10 + 3, y)
    assert pipe.score(X * 10 + 3, y) > 0.5


def _rounds(estimator, X, y):
    return len(estimator.rounds_)


def test_grid_search_over_sync_every(client, tiny_data):
    X, y = tiny_data
    net = _clf(strategy="local_sgd", max_epochs=2, train_split=None)
    search = GridSearchCV(net, {"sync_every": [1, 4]}, cv=2, refit=False,
                          scoring={"accuracy": "accuracy", "rounds": _rounds})
    search.fit(X, y)
    results = search.cv_results_
    # each candidate trained with its own sync_every: 120 samples, global batches of 32,
    # 4 steps an epoch: 4 rounds an epoch at sync_every=1, 1 at sync_every=4
    assert results["mean_test_rounds"].tolist() == [8, 2]
    # and each split's score is what the same fit gives outside the search
    for i, sync_every in enumerate([1, 4]):
        for split, (train, test) in enumerate(StratifiedKFold(2).split(X, y)):
            direct = clone(net).set_params(sync_every=sync_every).fit(X[train], y[train])
            assert results[f"split{split}_test_accuracy"][i] == direct.score(X[test], y[test])


def test_partial_fit_continues_training(client, tiny_data):
    X, y = tiny_data
    net = _clf(max_epochs=1, strategy="local_sgd", sync_every=2)
    net.partial_fit(X, y)
    before = params_vector(net.module_)
    net.partial_fit(X, y)
    assert len(net.history) == 2
    assert len(net.rounds_) == sum(net.history[:, "rounds"])
    assert not np.array_equal(before, params_vector(net.module_))
    with pytest.raises(ValueError, match="not seen"):
        net.partial_fit(X, y + 5)


def test_epoch_callbacks_run_on_the_client(client, tiny_data):
    X, y = tiny_data
    net = _clf(
        max_epochs=6, optimizer=torch.optim.SGD, lr=0.5,
        callbacks=[
            ("lr", LRScheduler(torch.optim.lr_scheduler.StepLR, step_size=1, gamma=0.5)),
            ("acc", EpochScoring("accuracy", lower_is_better=False, name="client_acc")),
            ("stop", EarlyStopping(monitor="train_loss", patience=1, threshold=10.0)),
        ],
    ).fit(X, y)
    # EarlyStopping stopped the run after patience epochs without a 10.0 improvement.
    assert len(net.history) == 2
    # EpochScoring scored each epoch's model on the client, on the workers' hold-out rows
    assert net.history[:, "client_acc"] == net.history[:, "valid_acc"]
    assert net.optimizer_.param_groups[0]["lr"] == 0.25  # halved for the second epoch

    # The learning rate reached the replicas: stepping it on the client trains as two
    # epochs at 0.5 and 0.25 do, and not as two epochs at 0.5.
    scheduled = _clf(max_epochs=2, lr=0.5, callbacks=[
        ("lr", LRScheduler(torch.optim.lr_scheduler.StepLR, step_size=1, gamma=0.5))]).fit(X, y)
    by_hand = _clf(max_epochs=1, lr=0.5).fit(X, y)
    by_hand.set_params(lr=0.25).partial_fit(X, y)
    constant = _clf(max_epochs=2, lr=0.5).fit(X, y)
    np.testing.assert_array_equal(params_vector(scheduled.module_),
                                  params_vector(by_hand.module_))
    assert not np.allclose(params_vector(scheduled.module_), params_vector(constant.module_))


def test_per_batch_features_are_refused_before_work(client, tiny_data):
    X, y = tiny_data
    with pytest.raises(ValueError, match="acts per batch"):
        _clf(callbacks=[("b", BatchScoring("accuracy"))]).fit(X, y)
    with pytest.raises(ValueError, match="step_every='epoch'"):
        _clf(callbacks=[("lr", LRScheduler(ReduceLROnPlateau, step_every="batch"))]).fit(X, y)
    with pytest.raises(ValueError, match="iterator_train__num_workers"):
        _clf(iterator_train__num_workers=2).fit(X, y)
    with pytest.raises(ValueError, match="ValidSplit"):
        _clf(train_split=lambda ds, y: (ds, None)).fit(X, y)

    class Custom(DaskNeuralNetClassifier):
        def train_step_single(self, batch, **fit_params):
            return super().train_step_single(batch, **fit_params)

    with pytest.raises(ValueError, match="overridden train_step_single"):
        Custom(TinyNet, max_epochs=1, verbose=0).fit(X, y)


def test_bad_input_gets_clear_errors(client, tiny_data):
    X, y = tiny_data
    bad = X.copy()
    bad[3, 4] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        _clf().fit(bad, y)
    with pytest.raises(ValueError, match="samples"):
        _clf().fit(X, y[:-1])
    with pytest.raises(ValueError, match="only one class"):
        _clf().fit(X, np.zeros(len(X), dtype=int))
    with pytest.raises(ValueError, match="Unknown label type|continuous"):
        _clf().fit(X, np.linspace(0, 1, len(X)))
    net = _clf(max_epochs=1).fit(X, y)
    with pytest.raises(ValueError, match="expecting 20 features"):
        net.predict(X[:, :5])
    with pytest.raises(ValueError, match="smaller than the number of replicas"):
        _clf(batch_size=1, n_replicas=2).fit(X, y)


def test_regressor_1d_and_2d_targets(client):
    rng = np.random.default_rng(1)
    X = rng.normal(size=(300, 5)).astype(np.float32)
    y = X @ rng.normal(size=5)
    net = DaskNeuralNetRegressor(MLP, module__output="linear", module__hidden=(16,),
                                 max_epochs=15, lr=0.05, batch_size=32, verbose=0,
                                 strategy="local_sgd", sync_every=2, random_state=0)
    net.fit(X, y)
    pred = net.predict(X)
    assert pred.shape == (300,)
    assert net.score(X, y) > 0.8
    pred_dask = net.predict(da.from_array(X, chunks=100))
    assert pred_dask.shape == (300,)
    np.testing.assert_allclose(pred_dask.compute(), pred, rtol=1e-5, atol=1e-5)
    y2 = np.stack([y, -y], axis=1).astype(np.float32)
    net2 = clone(net).fit(X, y2)
    assert net2.predict(X).shape == (300, 2)


def test_preprocessor_runs_on_workers_and_before_predict(client, tiny_data):
    X, y = tiny_data
    scaler = StandardScaler().fit(X * 100 + 7)
    net = _clf(max_epochs=4, preprocessor=scaler).fit(X * 100 + 7, y)
    assert net.score(X * 100 + 7, y) > 0.5
    shifted = da.from_array(X * 100 + 7, chunks=60)
    np.testing.assert_array_equal(net.predict(shifted).compute(), net.predict(X * 100 + 7))


def test_an_in_place_preprocessor_leaves_the_callers_array_alone(client, tiny_data):
    from dask_ml.preprocessing import StandardScaler as DaskMLScaler

    X, y = tiny_data
    X = (X * 100 + 7).astype(np.float32)
    original = X.copy()
    scaler = DaskMLScaler().fit(X)  # its transform works in place on numpy input
    net = _clf(max_epochs=2, preprocessor=scaler).fit(X, y)
    first = net.predict_proba(X)
    np.testing.assert_array_equal(net.predict_proba(X), first)
    np.testing.assert_array_equal(X, original)


def test_dask_predict_works_after_the_training_cluster_is_gone(tiny_data):
    from daskdist.clusters.embedded import embedded_cluster

    X, y = tiny_data
    cluster = embedded_cluster(n_workers=1)
    with Client(cluster, set_as_default=False) as c:
        net = _clf(max_epochs=1, scheduler_address=cluster.scheduler_address).fit(X, y)
        assert c.status == "running"
    cluster.close()
    # No cluster now: the dask array is computed by the local scheduler.
    out = net.predict(da.from_array(X, chunks=80)).compute(scheduler="threads")
    np.testing.assert_array_equal(out, net.predict(X))


def test_a_class_missing_from_one_shard_is_still_a_global_class(client):
    X, y = make_classification(300, n_classes=3)
    order = np.argsort(y, kind="stable")  # sequential shards: class 0 only in the first
    X, y = X[order], y[order]
    assert 0 not in set(y[150:])
    net = _clf(n_replicas=2, sharding="sequential", max_epochs=3, train_split=None).fit(X, y)
    np.testing.assert_array_equal(net.classes_, [0, 1, 2])
    proba = net.predict_proba(X)
    assert proba.shape == (300, 3)
    assert (net.predict(X[y == 0]) == 0).mean() > 0.5  # class 0 was learned all the same


def test_the_estimators_render_in_notebooks_without_docstring_warnings():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for cls in (DaskNeuralNetClassifier, DaskNeuralNetRegressor):
            assert "strategy" in cls(MLP)._repr_html_()
