"""Updates the driver applies as they arrive: ``async``, ``ssp``, and ``local_sgd`` with a
round deadline."""

import numpy as np
import pytest
import torch
from sklearn.model_selection import train_test_split

from daskdist import DaskNeuralNetClassifier
from daskdist._compat import workers as cluster_workers
from daskdist.checkpoint import load_checkpoint, save_checkpoint
from daskdist.state import TrainingState, params_vector, tree_add, tree_diff
from daskdist.strategies import SSP, Async, LocalSGD, Sync, resolve_strategy
from daskdist.testing import StragglerNet, TinyNet, make_classification


@pytest.fixture(scope="module")
def digits_split(digits):
    X, y = digits
    return train_test_split(X, y, test_size=0.25, random_state=0)


def _digits_net(client, **kwargs):
    params = dict(module__n_features=64, module__hidden=32, module__n_outputs=10,
                  max_epochs=8, lr=0.3, batch_size=64, sync_every=4, verbose=0, random_state=0,
                  train_split=None, iterator_train__shuffle=True)
    return DaskNeuralNetClassifier(kwargs.pop("module", TinyNet), **{**params, **kwargs})


def _clocks(rounds):
    """Each replica's count of applied updates after every update, in the order applied."""
    counts, history = {}, []
    for (replica,) in rounds["replicas"]:
        counts[replica] = counts.get(replica, 0) + 1
        history.append(dict(counts))
    return history


def test_ssp_with_staleness_0_equals_local_sgd(client):
    """In lock-step, a round's updates add up to the sample-weighted average."""
    X, y = make_classification(1200)
    params = dict(max_epochs=3, batch_size=64, lr=0.2, sync_every=4, train_split=None,
                  verbose=0, random_state=0, iterator_train__shuffle=True,
                  optimizer=torch.optim.SGD, optimizer__momentum=0.9)
    flat = DaskNeuralNetClassifier(TinyNet, strategy="local_sgd", **params).fit(X, y)
    ssp = DaskNeuralNetClassifier(TinyNet, strategy="ssp", strategy__staleness=0,
                                  **params).fit(X, y)
    # one update per replica and round (the last round of each pass is short)
    assert len(ssp.rounds_) == 2 * len(flat.rounds_)
    np.testing.assert_allclose(params_vector(ssp.module_), params_vector(flat.module_),
                               rtol=0, atol=1e-5)
    assert ssp.history[-1, "train_loss"] == pytest.approx(flat.history[-1, "train_loss"],
                                                          rel=1e-5)


@pytest.mark.parametrize("strategy", ["async", "ssp"])
def test_async_and_ssp_learn_digits_and_record_staleness(client, digits_split, strategy):
    X_train, X_test, y_train, y_test = digits_split
    net = _digits_net(client, strategy=strategy).fit(X_train, y_train)
    assert net.score(X_test, y_test) >= 0.93
    rounds = net.rounds_
    assert rounds["round"].tolist() == list(range(len(rounds)))  # each update applied once
    assert all(len(r) == 1 for r in rounds["replicas"])  # one replica per update
    # each epoch's updates cover the training set
    per_epoch = rounds.groupby("epoch")["samples"].sum()
    assert (per_epoch >= len(X_train)).all() and (per_epoch < len(X_train) + 2 * 64 * 4).all()
    history = net.history
    assert history[-1, "max_staleness"] == rounds[rounds.epoch == 7]["staleness"].max()
    assert history[-1, "mean_staleness"] == pytest.approx(
        rounds[rounds.epoch == 7]["staleness"].mean())
    assert (rounds["staleness"] >= 0).all() and rounds["staleness"].max() >= 1
    assert all(b > 0 for b in history[:, "bytes_sent"])


@pytest.fixture(scope="module")
def straggler_fits(session_client, digits_split):
    """``async``, ``ssp(1)``, and ``local_sgd`` and ``sync`` with a deadline on digits, replica
    0's steps four times slower than replica 1's."""
    X_train, _, y_train, _ = digits_split
    slow = sorted(cluster_workers(session_client))[0]  # replica 0's worker (numpy shards)
    fits = {}
    with session_client.as_current():
        for strategy, options in [("async", {}), ("ssp", {"strategy__staleness": 1}),
                                  ("local_sgd", {"strategy__deadline": 1.5}),
                                  # longer steps: a sync round's fixed cost would hide most of
                                  # the slow-down (one step per round)
                                  ("sync", {"strategy__deadline": 1.5,
                                            "module__step_time": 0.04, "max_epochs": 2})]:
            options = {"module__step_time": 0.01, "max_epochs": 3, **options}
            fits[strategy] = _digits_net(
                session_client, module=StragglerNet, module__slowdown=4.0,
                module__slow_worker=slow, sync_every=2, strategy=strategy,
                **options).fit(X_train, y_train)
    return fits


def test_async_lets_the_fast_replica_keep_going(straggler_fits, digits_split):
    net = straggler_fits["async"]
    updates = net.rounds_["replicas"].map(lambda r: r[0]).value_counts()
    assert updates[1] > 2 * updates[0]  # the fast replica did not wait for the slow one
    # the slow replica's updates are stale: the fast one's were applied meanwhile
    slow = net.rounds_[net.rounds_["replicas"] == (0,)]
    assert slow["staleness"].mean() > 1.5


def test_ssp_never_exceeds_its_staleness_bound(straggler_fits):
    net = straggler_fits["ssp"]
    gaps = [max(c.values()) - min(c.get(r, 0) for r in (0, 1)) for c in _clocks(net.rounds_)]
    # a replica starts round c only once the slowest has finished round c - 1 - staleness,
    # so applied rounds differ by at most staleness + 1; the slow replica makes it bind
    assert max(gaps) == 2
    # held to the slow one's pace, the fast replica made as many updates as it did
    updates = net.rounds_["replicas"].map(lambda r: r[0]).value_counts()
    assert abs(updates[1] - updates[0]) <= 2


@pytest.mark.parametrize("strategy", ["local_sgd", "sync"])
def test_a_deadline_that_is_never_missed_changes_nothing(client, strategy):
    X, y = make_classification(600 if strategy == "sync" else 1200)
    params = dict(max_epochs=3, batch_size=64, lr=0.2, sync_every=4, train_split=None,
                  verbose=0, random_state=0, iterator_train__shuffle=True,
                  optimizer=torch.optim.SGD, optimizer__momentum=0.9)
    flat = DaskNeuralNetClassifier(TinyNet, strategy=strategy, **params).fit(X, y)
    timed = DaskNeuralNetClassifier(TinyNet, strategy=strategy, strategy__deadline=1e6,
                                    **params).fit(X, y)
    # the same rounds, each closed with both replicas: the mean delta is the mean state,
    # and one step with the mean gradient is the step sync takes
    assert timed.rounds_["replicas"].tolist() == flat.rounds_["replicas"].tolist()
    assert (timed.rounds_["dropped"] == 0).all() and (timed.rounds_["staleness"] == 0).all()
    assert timed.history[:, "dropped_updates"] == [0, 0, 0]
    np.testing.assert_allclose(params_vector(timed.module_), params_vector(flat.module_),
                               rtol=0, atol=1e-5)


@pytest.mark.parametrize("strategy, compression", [("sync", "fp16"), ("sync", "topk"),
                                                   ("local_sgd", "bf16"), ("local_sgd", "topk")])
def test_a_deadline_that_is_never_missed_sends_packed_updates(client, strategy, compression):
    X, y = make_classification(600 if strategy == "sync" else 1200)
    # (plain SGD: compressed local_sgd keeps optimizer state on the replicas, with a
    # deadline it is averaged; sync takes the same step either way)
    params = dict(max_epochs=3, batch_size=64, lr=0.2, sync_every=4, train_split=None,
                  verbose=0, random_state=0, iterator_train__shuffle=True,
                  optimizer=torch.optim.SGD, strategy__compression=compression,
                  strategy__density=0.1, **({"optimizer__momentum": 0.9}
                                            if strategy == "sync" else {}))
    flat = DaskNeuralNetClassifier(TinyNet, strategy=strategy, **params).fit(X, y)
    timed = DaskNeuralNetClassifier(TinyNet, strategy=strategy, strategy__deadline=1e6,
                                    **params).fit(X, y)
    # the same packed updates (error feedback included), averaged the same way
    assert timed.rounds_["replicas"].tolist() == flat.rounds_["replicas"].tolist()
    np.testing.assert_allclose(params_vector(timed.module_), params_vector(flat.module_),
                               rtol=0, atol=1e-5)
    # what replicas sent was packed: less than the same deadline fit sends unpacked
    plain = DaskNeuralNetClassifier(TinyNet, strategy=strategy, strategy__deadline=1e6,
                                    **{k: v for k, v in params.items()
                                       if not k.startswith("strategy__")}).fit(X, y)
    assert (timed.rounds_["bytes"] < plain.rounds_["bytes"]).all()


@pytest.mark.parametrize("strategy", ["local_sgd", "sync"])
def test_deadline_closes_rounds_without_the_straggler_and_folds_its_updates_in(
        straggler_fits, digits_split, strategy):
    X_train, X_test, _, y_test = digits_split
    net = straggler_fits[strategy]
    rounds = net.rounds_
    assert rounds["round"].tolist() == list(range(len(rounds)))  # each round applied once
    # no update lost: each epoch's applied updates cover the training set
    per_epoch = rounds.groupby("epoch")["samples"].sum()
    assert (per_epoch >= len(X_train)).all() and (per_epoch < len(X_train) + 2 * 64 * 2).all()
    dropped = int(rounds["dropped"].sum())
    assert dropped > 0 and sum(net.history[:, "dropped_updates"]) == dropped
    # rounds closed on the fast replica alone, and the slow one's late updates were folded
    # into later rounds (applied to a newer state than they started from)
    assert (rounds["replicas"] == (1,)).sum() >= dropped // 2
    folded = rounds[rounds["staleness"] > 0]
    assert 0 < len(folded) <= dropped
    assert sum(0 in r for r in folded["replicas"]) >= 0.9 * len(folded)
    updates = rounds["replicas"].explode().value_counts()
    assert updates[1] > 1.5 * updates[0]  # the fast replica did not wait for the slow one
    last = rounds[rounds.epoch == rounds.epoch.max()]
    assert net.history[-1, "max_staleness"] == last["staleness"].max()
    assert net.score(X_test, y_test) > 0.85


def test_strategy_options_are_checked():
    assert resolve_strategy("async", sync_every=3) == Async(sync_every=3)
    assert resolve_strategy("ssp", {"staleness": 0}) == SSP(staleness=0)
    with pytest.raises(ValueError, match="staleness must be an integer >= 0"):
        resolve_strategy("ssp", {"staleness": -1})
    with pytest.raises(ValueError, match="needs a staleness bound"):
        SSP(staleness=None)
    with pytest.raises(ValueError, match="has no option 'staleness'"):
        resolve_strategy("async", {"staleness": 2})
    with pytest.raises(ValueError, match="sync_every must be an integer >= 1"):
        resolve_strategy("async", {"sync_every": 0})
    assert resolve_strategy("local_sgd", {"deadline": 2}) == LocalSGD(deadline=2)
    for bad in (1, 0.5, "2", True):
        with pytest.raises(ValueError, match="deadline must be None or a number > 1"):
            resolve_strategy("local_sgd", {"deadline": bad})
    assert resolve_strategy("sync", {"deadline": 2, "compression": "topk"}) == \
        Sync(deadline=2, compression="topk")


def test_deltas_add_leaf_by_leaf_and_cursors_survive_a_checkpoint(tmp_path):
    before = {"w": np.ones(3, np.float32), "opt": {"state": {}, "lr": 0.1}}
    after = {"w": np.full(3, 3.0, np.float32),
             "opt": {"state": {0: {"step": np.array(2.0, np.float32)}}, "lr": 0.2}}
    delta = tree_diff(after, before)
    np.testing.assert_array_equal(delta["w"], np.full(3, 2.0, np.float32))
    assert delta["opt"]["lr"] == 0.2  # not a float array: taken from the newer tree
    moved = tree_add(before, delta, 0.5)
    np.testing.assert_array_equal(moved["w"], np.full(3, 2.0, np.float32))
    # state that did not exist before counts from zero, and 0-d arrays stay arrays
    step = moved["opt"]["state"][0]["step"]
    assert isinstance(step, np.ndarray) and step.shape == () and step == 1.0

    state = TrainingState(params=np.arange(4, dtype=np.float32), round=7,
                          cursors=((1, 4, 9), (0, 12, 6)))
    save_checkpoint(tmp_path / "ckpt", state)
    loaded, _ = load_checkpoint(tmp_path / "ckpt")
    assert loaded.cursors == state.cursors
