"""A replica whose loss or update is not finite is left out, logged, and bounded."""

import dask
import numpy as np
import pytest

from daskdist import MLP, DaskNeuralNetRegressor, NonFiniteError
from daskdist.state import params_vector
from daskdist.testing import TinySequential

#: A sample whose target overflows the squared error in float32: its loss is inf.
POISON_ROW = 605  # in replica 1's first batch of every epoch (sequential shards of 600)


def _data(poison=True):
    rng = np.random.default_rng(0)
    X = rng.normal(size=(1200, 8)).astype(np.float32)
    y = (X @ rng.normal(size=8) + 0.1 * rng.normal(size=1200)).astype(np.float32)
    if poison:
        y[POISON_ROW] = 1e30  # finite, so input validation lets it in
    return X, y


def _net(client, strategy, **kwargs):
    params = dict(module__hidden=(16,), module__output="linear", max_epochs=3, batch_size=32,
                  lr=0.05, strategy=strategy, sync_every=2, sharding="sequential",
                  train_split=None, verbose=0, random_state=0,
                  scheduler_address=client.scheduler.address)
    if strategy == "pipeline":  # a Sequential to split, and two pipelines (two shards)
        del params["module__output"]
        params.update(module__hidden=16, module__n_features=8, module__n_outputs=1,
                      module__softmax=False, n_replicas=2)
        return DaskNeuralNetRegressor(TinySequential, **{**params, **kwargs})
    return DaskNeuralNetRegressor(MLP, **{**params, **kwargs})


@pytest.mark.parametrize("strategy", ["sync", "local_sgd"])
def test_non_finite_update_is_skipped_and_logged(client, strategy, caplog):
    X, y = _data()
    with caplog.at_level("WARNING", logger="daskdist.driver.trainer"):
        net = _net(client, strategy).fit(X, y)
    rounds = net.rounds_
    skipped = rounds[rounds["skipped"].map(len) > 0]
    # replica 1's first round of every epoch, and nothing else
    first_rounds = rounds.groupby("epoch")["round"].min().tolist()
    assert skipped["round"].tolist() == first_rounds
    assert set(skipped["skipped"]) == {(1,)}
    assert set(skipped["replicas"]) == {(0,)}  # the round averaged replica 0 only
    assert net._training_state_.skipped == 3
    assert np.isfinite(params_vector(net.module_)).all()
    assert np.isfinite(net.history[:, "train_loss"]).all()
    assert net.score(np.delete(X, POISON_ROW, 0), np.delete(y, POISON_ROW)) > 0.8
    assert any("non-finite" in r.message and "(1,)" in r.message for r in caplog.records)


@pytest.mark.parametrize("strategy", ["ddp", "pipeline"])
def test_non_finite_step_is_skipped_as_a_whole(client, strategy):
    X, y = _data()
    net = _net(client, strategy).fit(X, y)
    rounds = net.rounds_
    skipped = rounds[rounds["skipped"].map(len) > 0]
    # the (allreduced, or summed) gradient of replica 1's first step of every epoch is not
    # finite: every rank (every stage of every pipeline) skips that step, and it counts once
    assert skipped["round"].tolist() == rounds.groupby("epoch")["round"].min().tolist()
    assert set(skipped["skipped"]) == {(1,)}
    assert set(skipped["replicas"]) == {()} and (skipped["samples"] == 0).all()
    assert net._training_state_.skipped == 3
    assert np.isfinite(params_vector(net.module_)).all()
    assert net.score(np.delete(X, POISON_ROW, 0), np.delete(y, POISON_ROW)) > 0.8


def test_non_finite_update_is_left_out_under_updates_applied_as_they_arrive(client):
    X, y = _data()
    # staleness 0: the replicas keep in step, so replica 1 makes exactly 3 passes
    net = _net(client, "ssp", strategy__staleness=0).fit(X, y)
    rounds = net.rounds_
    skipped = rounds[rounds["skipped"].map(len) > 0]
    assert len(skipped) == 3 and set(skipped["skipped"]) == {(1,)}
    assert set(skipped["replicas"]) == {()} and (skipped["samples"] == 0).all()
    assert net._training_state_.skipped == 3
    assert np.isfinite(params_vector(net.module_)).all()
    assert net.score(np.delete(X, POISON_ROW, 0), np.delete(y, POISON_ROW)) > 0.8


@pytest.mark.parametrize("strategy", ["sync", "local_sgd", "ssp", "ddp", "pipeline"])
def test_too_many_non_finite_updates_fail_the_fit(client, strategy):
    X, y = _data()
    net = _net(client, strategy, **({"strategy__staleness": 0} if strategy == "ssp" else {}))
    with dask.config.set({"daskdist.driver.max-non-finite": 1}):
        with pytest.raises(NonFiniteError, match=r"Replica\(s\) \[1\].*round \d+ \(epoch 1\)"):
            net.fit(X, y)
    # the fit stopped in the second epoch; the estimator keeps the first one's finite state
    assert [e["epoch"] for e in net.history if "train_loss" in e] == [1]
    assert np.isfinite(params_vector(net.module_)).all()


def test_every_replica_non_finite_keeps_the_state(client):
    X, y = _data(poison=False)
    net = _net(client, "local_sgd", lr=1e30, max_epochs=1)  # diverges at once everywhere
    with dask.config.set({"daskdist.driver.max-non-finite": None}):
        net.fit(X, y)
    assert set(net.rounds_["replicas"]) == {()}
    assert np.isfinite(params_vector(net.module_)).all()
