"""Strategies from the estimators: hierarchical averaging, compressed sync, tuning."""

import numpy as np
import pytest
import torch
from sklearn.model_selection import GridSearchCV, train_test_split

from daskdist import DaskNeuralNetClassifier
from daskdist.models import MLP
from daskdist.state import module_to_state
from daskdist.strategies import Hierarchical, resolve_strategy
from daskdist.strategies.hierarchical import groups_by_host, relay_sources
from daskdist.testing import TinyNet

N_PARAMS = 64 * 64 + 64 + 64 * 10 + 10  # MLP(hidden=(64,)) on digits


@pytest.fixture(scope="module")
def digits_split(digits):
    X, y = digits
    return train_test_split(X, y, test_size=0.25, random_state=0)


@pytest.fixture(scope="module")
def plain_sync(session_client, digits_split):
    """Uncompressed ``sync`` on digits, the reference of the compressed runs."""
    X_train, _, y_train, _ = digits_split
    with session_client.as_current():
        return _digits_net(strategy="sync").fit(X_train, y_train)


def _digits_net(**kwargs):
    params = dict(module__hidden=(64,), max_epochs=10, lr=0.1, batch_size=64, verbose=0,
                  random_state=0, train_split=None, iterator_train__shuffle=True)
    return DaskNeuralNetClassifier(MLP, **{**params, **kwargs})


def _params(net):
    return torch.nn.utils.parameters_to_vector(net.module_.parameters()).detach().numpy()


def _split_first_rounds(net):
    """``(bytes of each epoch's first round, of the others)`` as sets, and the state's bytes.

    An epoch's first round also counts the starting state (parameters,
    buffers, optimizer state) fetched by the worker that does not hold it.
    """
    rounds = net.rounds_
    first = rounds["round"] == rounds.groupby("epoch")["round"].transform("min")
    start = module_to_state(net.module_, net.optimizer_).nbytes
    return set(rounds["bytes"][first]), set(rounds["bytes"][~first]), start


def test_hierarchical_equals_flat_averaging(client, tiny_data):
    X, y = tiny_data
    params = dict(max_epochs=3, lr=0.3, batch_size=40, n_replicas=4, sync_every=3,
                  verbose=0, random_state=0, train_split=None)
    flat = DaskNeuralNetClassifier(TinyNet, strategy="local_sgd", **params).fit(X, y)
    grouped = DaskNeuralNetClassifier(TinyNet, strategy="hierarchical",
                                      strategy__groups=[[0, 1], [2, 3]], **params).fit(X, y)
    by_host = DaskNeuralNetClassifier(TinyNet, strategy="hierarchical", **params).fit(X, y)
    # a group per worker (replicas 0 and 2 share one): the group away from the root reads the
    # new state through a relay on its first worker
    relayed = DaskNeuralNetClassifier(TinyNet, strategy="hierarchical",
                                      strategy__groups=[[0, 2], [1, 3]], **params).fit(X, y)
    for net in (grouped, by_host, relayed):
        np.testing.assert_allclose(_params(net), _params(flat), rtol=1e-5, atol=1e-6)
    assert grouped.rounds_["round"].tolist() == flat.rounds_["round"].tolist()


def test_hierarchical_state_crosses_once_to_each_other_host():
    hosts = {"a": ["tcp://10.0.0.1:1", "tcp://10.0.0.1:2"],
             "b": ["tcp://10.0.0.2:1", "tcp://10.0.0.2:2"],
             "c": ["tcp://10.0.0.3:1", "tcp://10.0.0.3:2"]}
    workers = [w for ws in hosts.values() for w in ws for _ in range(2)]  # 2 replicas each
    groups = groups_by_host(workers)
    holder = hosts["b"][1]  # the root that computed the state: not a group's first worker
    sources = relay_sources(workers, groups, holder)
    assert set(sources) == set(workers)
    host = {w: h for h, ws in hosts.items() for w in ws}
    fetches = [(source or holder, w) for w, source in sources.items() if w != source]
    fetches += [(holder, source) for source in set(sources.values()) - {None}
                if source != holder]
    crossing = [(a, b) for a, b in fetches if a != b and host[a] != host[b]]
    # one copy to each other host's first worker; within a host, from there
    assert sorted(crossing) == [(holder, hosts["a"][0]), (holder, hosts["c"][0])]
    # the holder's own host reads the holder's copy
    assert sources[hosts["b"][0]] is None and sources[holder] is None


def test_hierarchical_groups_by_host_and_checks_explicit_groups(client, tiny_data):
    workers = ["tcp://10.0.0.1:4001", "tcp://10.0.0.2:4001", "tcp://10.0.0.1:4002",
               "tls://10.0.0.2:4002"]
    assert groups_by_host(workers) == [[0, 2], [1, 3]]
    for groups in ([[0, 1], [1]], [[0], []], [0, 1], [["a"]]):
        with pytest.raises(ValueError, match="groups"):
            Hierarchical(groups=groups)
    X, y = tiny_data
    net = DaskNeuralNetClassifier(TinyNet, strategy="hierarchical", n_replicas=2,
                                  strategy__groups=[[0], [1], [2]], verbose=0)
    with pytest.raises(ValueError, match="every replica 0..1"):
        net.fit(X, y)


@pytest.mark.parametrize("compression", ["fp16", "bf16"])
def test_half_precision_sync_keeps_accuracy_and_halves_the_bytes(client, digits_split,
                                                                 plain_sync, compression):
    X_train, X_test, y_train, y_test = digits_split
    plain = plain_sync
    packed = _digits_net(strategy="sync", strategy__compression=compression).fit(
        X_train, y_train)
    assert packed.score(X_test, y_test) >= plain.score(X_test, y_test) - 0.01
    # each of the two replicas fetches the other's gradient every step; the epoch's first
    # step also fetches the starting state to the worker that does not hold it
    for net, sent in ((plain, 2 * N_PARAMS * 4), (packed, 2 * N_PARAMS * 2)):
        first, others, start = _split_first_rounds(net)
        assert others == {sent} and first == {sent + start}
        assert start >= N_PARAMS * 4
    assert packed.history[-1, "bytes_sent"] == \
        2 * N_PARAMS * 2 * packed.history[-1, "rounds"] + start


def test_topk_sync_with_error_feedback_converges_on_a_fiftieth_of_the_bytes(client,
                                                                           digits_split):
    X_train, X_test, y_train, y_test = digits_split
    net = _digits_net(strategy="sync", strategy__compression="topk", strategy__density=0.01)
    net.fit(X_train, y_train)
    assert net.score(X_test, y_test) >= 0.9
    k = round(0.01 * N_PARAMS)
    first, others, start = _split_first_rounds(net)
    assert others == {2 * k * 8} and first == {2 * k * 8 + start}  # int32 + float32 each
    assert (2 * N_PARAMS * 4) / (2 * k * 8) >= 20
    assert net.history[-1, "sync_time"] > 0


@pytest.fixture(scope="module")
def plain_local_sgd(session_client, digits_split):
    """Uncompressed ``local_sgd`` on digits, the reference of the compressed runs."""
    X_train, _, y_train, _ = digits_split
    with session_client.as_current():
        return _digits_net(strategy="local_sgd", sync_every=4, lr=0.3).fit(X_train, y_train)


@pytest.mark.parametrize("compression, density", [("fp16", 0.01), ("bf16", 0.01),
                                                  ("topk", 0.01)])
def test_compressed_local_sgd_exchanges_packed_deltas(client, digits_split, plain_local_sgd,
                                                      compression, density):
    X_train, X_test, y_train, y_test = digits_split
    plain = plain_local_sgd
    packed = _digits_net(strategy="local_sgd", sync_every=4, lr=0.3,
                         strategy__compression=compression, strategy__density=density)
    packed.fit(X_train, y_train)
    if compression == "topk":  # error feedback brings the dropped entries in later
        assert packed.score(X_test, y_test) >= 0.9
    else:
        assert packed.score(X_test, y_test) >= plain.score(X_test, y_test) - 0.01
    # uncompressed: parameters, buffers and optimizer state to the average and the new
    # state back; compressed: each replica fetches the other's packed delta, nothing more
    entry = {"fp16": 2, "bf16": 2, "topk": 8}[compression]
    sent = 2 * (round(density * N_PARAMS) if compression == "topk" else N_PARAMS) * entry
    first, others, start = _split_first_rounds(packed)
    assert others == {sent} and first == {sent + start}
    assert plain.rounds_["bytes"].min() >= 2 * N_PARAMS * 4
    assert packed.history[-1, "bytes_sent"] == packed.rounds_[
        packed.rounds_["epoch"] == packed.rounds_["epoch"].max()]["bytes"].sum()


def test_compressed_hierarchical_of_one_replica_groups_is_compressed_local_sgd(client,
                                                                              digits_split):
    X_train, _, y_train, _ = digits_split
    params = dict(max_epochs=3, sync_every=4, lr=0.3, strategy__compression="topk",
                  strategy__density=0.05)
    flat = _digits_net(strategy="local_sgd", **params).fit(X_train, y_train)
    grouped = _digits_net(strategy="hierarchical", strategy__groups=[[0], [1]],
                          **params).fit(X_train, y_train)
    # a group of one packs its replica's delta with its own error-feedback memory
    np.testing.assert_allclose(_params(grouped), _params(flat), rtol=0, atol=1e-6)
    assert grouped.rounds_["bytes"].tolist() == flat.rounds_["bytes"].tolist()


def test_compressed_hierarchical_sends_one_packed_delta_per_group(client, digits_split):
    X_train, X_test, y_train, y_test = digits_split
    # four replicas on two workers (0 and 2 on one, 1 and 3 on the other): a group per worker
    net = _digits_net(strategy="hierarchical", n_replicas=4, sync_every=4, lr=0.3,
                      strategy__groups=[[0, 2], [1, 3]], strategy__compression="topk",
                      strategy__density=0.01).fit(X_train, y_train)
    assert net.score(X_test, y_test) >= 0.9
    # deltas meet their group's worker where they are; then each group's worker fetches the
    # other group's packed delta: 2 packed deltas per round, where flat averaging of packed
    # deltas would send each replica the two of the other worker's replicas (8)
    k = round(0.01 * N_PARAMS)
    first, others, start = _split_first_rounds(net)
    assert others == {2 * k * 8} and first == {2 * k * 8 + start}
    assert set(net.rounds_["replicas"]) == {(0, 1, 2, 3)}


def test_strategy_options_are_checked_and_tunable(client, tiny_data):
    with pytest.raises(ValueError, match="compression must be one of"):
        resolve_strategy("sync", {"compression": "zip"})
    with pytest.raises(ValueError, match="density must be a number in"):
        resolve_strategy("local_sgd", {"compression": "topk", "density": 0})
    with pytest.raises(ValueError, match="has no option 'deadline'"):
        resolve_strategy("hierarchical", {"deadline": 2})
    with pytest.raises(ValueError, match="has no option 'staleness'"):
        resolve_strategy("local_sgd", {"staleness": 2})
    X, y = tiny_data
    grid = [{"strategy": ["sync", "local_sgd", "hierarchical"], "sync_every": [1, 4]},
            {"strategy": ["ssp"], "strategy__staleness": [0, 2]},
            {"strategy": ["async"], "sync_every": [2]}]
    search = GridSearchCV(
        DaskNeuralNetClassifier(TinyNet, max_epochs=4, lr=0.3, batch_size=32, verbose=0,
                                random_state=0, train_split=None), grid, cv=2)
    search.fit(X, y)
    assert len(search.cv_results_["params"]) == 9
    assert search.best_params_["strategy"] in ("sync", "local_sgd", "hierarchical", "ssp",
                                               "async")
    assert search.best_score_ > 0.5
    assert (search.cv_results_["mean_test_score"] > 0.4).all()


def test_partial_fit_inside_dask_tasks_on_single_threaded_workers(client, tiny_data):
    """What a search that trains in tasks (dask-ml's Hyperband) needs: no deadlock."""
    X, y = tiny_data
    nets = [DaskNeuralNetClassifier(TinyNet, max_epochs=2, batch_size=32, lr=lr, verbose=0,
                                    train_split=None, strategy=strategy, sync_every=2,
                                    random_state=0, classes=[0, 1, 2])
            for lr, strategy in [(0.3, "local_sgd"), (0.3, "async"), (0.3, "sync")]]
    # three fits at once, each holding one of the two worker threads while its rounds run
    futures = [client.submit(DaskNeuralNetClassifier.partial_fit, net, X, y, pure=False)
               for net in nets]
    fitted = client.gather(futures)
    assert all(len(net.history) == 2 for net in fitted)
    assert all(net.score(X, y) > 0.6 for net in fitted)
    # and a fitted estimator goes on where it stopped
    again = client.submit(DaskNeuralNetClassifier.partial_fit, fitted[0], X, y,
                          pure=False).result(timeout=120)
    assert len(again.history) == 4


@pytest.mark.parametrize("strategy, options", [
    ("sync", {}), ("sync", {"strategy__compression": "fp16"}), ("local_sgd", {}),
    ("local_sgd", {"strategy__compression": "topk", "strategy__density": 0.1}),
    ("hierarchical", {}), ("ddp", {}), ("pipeline", {}),
])
def test_the_same_random_state_gives_the_same_fit(client, tiny_data, strategy, options):
    # (async and ssp apply updates in the order they arrive, and a round deadline closes
    # rounds by arrival: those fits are not repeatable bit for bit, as docs/strategies.md says)
    from daskdist.testing import TinySequential

    X, y = tiny_data
    module = TinySequential if strategy == "pipeline" else TinyNet
    params = dict(max_epochs=2, lr=0.2, batch_size=32, verbose=0, random_state=7,
                  strategy=strategy, sync_every=2, iterator_train__shuffle=True,
                  optimizer__momentum=0.9, **options)
    first = DaskNeuralNetClassifier(module, **params).fit(X, y)
    second = DaskNeuralNetClassifier(module, **params).fit(X, y)
    if strategy == "pipeline":  # a stage adds its micro-batches' gradients as they come back
        np.testing.assert_allclose(_params(first), _params(second), rtol=0, atol=1e-6)
    else:
        np.testing.assert_array_equal(_params(first), _params(second))
    other = DaskNeuralNetClassifier(module, **{**params, "random_state": 8}).fit(X, y)
    assert not np.array_equal(_params(first), _params(other))
