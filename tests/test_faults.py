"""Faults during a fit: workers killed or hung, poison shards (real processes, real kills)."""

import contextlib
import os
import signal
import threading
import time

import dask
import dask.array as da
import numpy as np
import pytest
from distributed import Client
from skorch.callbacks import Callback

from daskdist import DaskNeuralNetClassifier
from daskdist.clusters.embedded import embedded_cluster
from daskdist.state import params_vector
from daskdist.testing import TinyNet, make_classification

#: Dask gives up on a task after it killed this many workers + 1 (3 by default).
ALLOWED_FAILURES = 1


def _fault_cluster():
    """A cluster of its own: these tests kill its workers (the nanny restarts them)."""
    with dask.config.set({"distributed.scheduler.allowed-failures": ALLOWED_FAILURES}):
        cluster = embedded_cluster(n_workers=2)
    client = Client(cluster, set_as_default=False)
    yield client
    client.close()
    cluster.close()


fault_client = pytest.fixture(scope="module")(_fault_cluster)
#: The poison-shard tests start from a cluster whose workers were never killed.
poison_client = pytest.fixture(scope="module")(_fault_cluster)


def _kill_a_worker(client):
    address = sorted(client.scheduler_info(n_workers=-1)["workers"])[0]
    pid = client.run(os.getpid, workers=[address])[address]
    os.kill(pid, signal.SIGKILL)
    return address


class KillAfterEpoch(Callback):
    def __init__(self, client, epoch=1):
        self.client, self.epoch = client, epoch

    def on_epoch_end(self, net, **kwargs):
        if len(net.history) == self.epoch:
            self.killed = _kill_a_worker(self.client)


def _net(client, **kwargs):
    params = dict(max_epochs=4, batch_size=32, lr=0.3, strategy="local_sgd", sync_every=2,
                  verbose=0, random_state=0, scheduler_address=client.scheduler.address)
    return DaskNeuralNetClassifier(TinyNet, **{**params, **kwargs})


@pytest.mark.timeout(180)
@pytest.mark.parametrize("kind", ["numpy", "dask"])
def test_worker_killed_between_epochs(fault_client, kind):
    X, y = make_classification(1200)
    Xin = da.from_array(X, chunks=200) if kind == "dask" else X
    kill = KillAfterEpoch(fault_client)
    net = _net(fault_client, callbacks=[("kill", kill)]).fit(Xin, y)
    assert kill.killed
    assert len(net.history) == 4
    assert net.score(X, y) > 0.6
    # every round of every epoch was applied once
    assert net.rounds_["round"].tolist() == list(range(len(net.rounds_)))


@pytest.mark.timeout(180)
@pytest.mark.parametrize("kind, strategy", [("numpy", "local_sgd"), ("dask", "local_sgd"),
                                            ("numpy", "sync"), ("dataset", "sync")])
def test_worker_killed_between_rounds(fault_client, tmp_path, kind, strategy):
    from daskdist.testing import KillWorkerOnTask, write_npy_files

    fault_client.wait_for_workers(2, timeout=60)  # a worker killed earlier is back
    X, y = make_classification(3000)
    Xin = {"dask": lambda: da.from_array(X, chunks=500),
           "dataset": lambda: write_npy_files(tmp_path / "files", X, y)}.get(kind, lambda: X)()
    yin = None if kind == "dataset" else y  # a dataset's samples hold their targets
    baseline = _net(fault_client, max_epochs=4, sync_every=1, strategy=strategy).fit(Xin, yin)
    # replica 1's worker dies as it starts round 30 of 300, once round 29 is done; the
    # fit goes on with the one worker left until the nanny's new worker joins
    victim = 30
    (tmp_path / "kills").mkdir()
    plugin = KillWorkerOnTask(rf"^\('daskdist-round-.*', {victim}, 1\)$", tmp_path / "kills")
    fault_client.register_plugin(plugin)
    try:
        net = _net(fault_client, max_epochs=4, sync_every=1, strategy=strategy).fit(Xin, yin)
    finally:
        fault_client.unregister_worker_plugin(plugin.name)
    assert len(plugin.kills()) == 1
    assert len(net.history) == 4 and net.score(X, y) > 0.6
    # the driver went on from the newest state a live worker held: one finished round
    # lost at most (numpy shards cannot be recomputed, so the driver must step in; a dask
    # or dataset shard Dask may recompute from its chunks or its dataset by itself)
    assert len(net.recoveries_) == 1 if kind == "numpy" else len(net.recoveries_) <= 1
    for _, recovery in net.recoveries_.iterrows():
        assert recovery["epoch"] == 0 and recovery["round"] >= victim - 1
        assert recovery["rounds_lost"] <= 1
    # every round was applied once, and rounds are pure functions of their inputs
    assert net.rounds_["round"].tolist() == list(range(len(baseline.rounds_)))
    np.testing.assert_array_equal(params_vector(net.module_), params_vector(baseline.module_))


def _assert_idle(client, timeout=10.0):
    """Assert that no task is running, queued or waiting on the cluster (within ``timeout``).

    ``Client.call_stack`` also sees the tasks that run on although no one wants their
    result any more (the scheduler forgets those).
    """
    deadline = time.monotonic() + timeout
    while True:
        busy = {w: list(keys) for w, keys in client.processing().items() if keys}
        running = {w: list(stacks) for w, stacks in client.call_stack().items() if stacks}
        if not busy and not running:
            return
        assert time.monotonic() < deadline, f"left on the workers: {busy or running}"
        time.sleep(0.2)


@pytest.fixture(scope="module")
def three_workers():
    """Three workers, so that a fit goes on with two after one dies."""
    cluster = embedded_cluster(n_workers=3)
    client = Client(cluster, set_as_default=False)
    yield client
    client.close()
    cluster.close()


@pytest.mark.timeout(240)
@pytest.mark.parametrize("kind, strategy", [("numpy", "local_sgd"), ("numpy", "sync"),
                                            ("dask", "local_sgd"), ("stream", "sync"),
                                            ("numpy", "local_sgd-fp16"),
                                            ("numpy", "hierarchical-fp16"),
                                            ("numpy", "sync-fp16"), ("numpy", "sync-bf16"),
                                            ("numpy", "local_sgd-bf16"),
                                            ("numpy", "hierarchical"),
                                            ("numpy", "hierarchical-bf16"),
                                            ("numpy", "diloco")])
def test_worker_killed_mid_epoch_loses_at_most_one_round(three_workers, digits, tmp_path,
                                                         kind, strategy):
    from sklearn.model_selection import train_test_split

    from daskdist.testing import KillWorkerOnTask

    three_workers.wait_for_workers(3, timeout=60)  # a worker killed earlier is back
    X, y = digits
    X_train, X_test, y_train, y_test = train_test_split(X, y, test_size=0.25, random_state=0)
    # chunks of 300: whole-chunk shards of 450, 450 and 447 samples, so one replica runs out
    # a step early in each epoch's last round
    Xin = da.from_array(X_train, chunks=300) if kind in ("dask", "stream") else X_train
    strategy, _, compression = strategy.partition("-")  # replicas exchange packed deltas
    params = dict(max_epochs=6, batch_size=96, lr=0.2, strategy=strategy, sync_every=2,
                  train_split=None, verbose=0, random_state=0,
                  scheduler_address=three_workers.scheduler.address,
                  **({"strategy__compression": compression} if compression else {}))
    if kind == "stream":  # replicas read their chunks as they train, in a buffer of two
        params.update(streaming=True, buffer_chunks=2, iterator_train__shuffle=True)
    baseline = DaskNeuralNetClassifier(TinyNet, module__n_features=64, module__hidden=32,
                                       module__n_outputs=10, **params).fit(Xin, y_train)
    rounds = len(baseline.rounds_)
    victim = rounds // 2  # halfway through the fit, in the middle of an epoch
    plugin = KillWorkerOnTask(rf"^\('daskdist-round-.*', {victim}, 1\)$", tmp_path)
    three_workers.register_plugin(plugin)
    try:
        net = DaskNeuralNetClassifier(TinyNet, module__n_features=64, module__hidden=32,
                                      module__n_outputs=10, **params).fit(Xin, y_train)
    finally:
        three_workers.unregister_worker_plugin(plugin.name)
    assert len(plugin.kills()) == 1  # a worker died while it ran replica 1's round
    # every round was applied once, by the replicas of the fault-free run (all three, but
    # where whole chunks make one shard a few samples short and it runs out a step early)
    assert net.rounds_["round"].tolist() == list(range(rounds))
    assert net.rounds_["replicas"].tolist() == baseline.rounds_["replicas"].tolist()
    assert (0, 1, 2) in set(net.rounds_["replicas"])
    # the driver recovered (numpy shards cannot be recomputed) losing at most one round
    if kind == "numpy":
        assert len(net.recoveries_) == 1
        assert net.recoveries_["rounds_lost"].max() <= 1
        assert net.recoveries_["round"].iloc[0] >= victim - 1
    assert abs(net.score(X_test, y_test) - baseline.score(X_test, y_test)) <= 0.02
    assert baseline.score(X_test, y_test) > 0.9
    # rounds are pure functions of their inputs: the recovered run is the same run
    np.testing.assert_array_equal(params_vector(net.module_), params_vector(baseline.module_))


@pytest.mark.timeout(240)
@pytest.mark.parametrize("strategy", ["sync", "local_sgd", "hierarchical", "diloco",
                                      "diloco-overlap"])
def test_a_worker_killed_under_topk_is_recovered_exactly(three_workers, digits, tmp_path,
                                                         strategy):
    """The lost worker takes its replica's error-feedback memory (and, for ``local_sgd`` and
    ``hierarchical``, its own momentum): the epoch continues from its start, which every
    replica's part came with, and the fit ends where the undisturbed one does. (Overlapped
    rounds hold no state to continue from mid-epoch: the epoch starts again too.)"""
    from daskdist.testing import KillWorkerOnTask

    three_workers.wait_for_workers(3, timeout=60)  # a worker killed earlier is back
    X, y = digits
    strategy, overlap = strategy.removesuffix("-overlap"), strategy.endswith("-overlap")
    params = dict(max_epochs=4, batch_size=96, lr=0.1, strategy=strategy, sync_every=2,
                  optimizer__momentum=0.9, strategy__compression="topk",
                  **({"strategy__overlap": True} if overlap else {}),
                  strategy__density=0.1, train_split=None, verbose=0, random_state=0,
                  scheduler_address=three_workers.scheduler.address)
    net_args = dict(module__n_features=64, module__hidden=32, module__n_outputs=10)
    baseline = DaskNeuralNetClassifier(TinyNet, **net_args, **params).fit(X, y)
    rounds = baseline.rounds_
    epoch_starts = rounds.groupby("epoch")["round"].min()
    victim = int(epoch_starts.iloc[2]) + 3  # a few rounds into epoch 2
    plugin = KillWorkerOnTask(rf"^\('daskdist-round-.*', {victim}, 1\)$", tmp_path)
    three_workers.register_plugin(plugin)
    try:
        net = DaskNeuralNetClassifier(TinyNet, **net_args, **params).fit(X, y)
    finally:
        three_workers.unregister_worker_plugin(plugin.name)
    assert len(plugin.kills()) == 1
    assert len(net.recoveries_) == 1
    recovery = net.recoveries_.iloc[0]
    # the part the dead worker held is gone: the epoch started again, rounds done counted lost
    assert recovery["round"] == epoch_starts.iloc[2]
    assert recovery["rounds_lost"] >= 1
    assert net.rounds_["round"].tolist() == rounds["round"].tolist()
    np.testing.assert_allclose(params_vector(net.module_), params_vector(baseline.module_),
                               atol=1e-6, rtol=0)


@pytest.mark.timeout(180)
def test_worker_killed_mid_epoch_under_ddp_reforms_the_group(three_workers, digits, tmp_path):
    from sklearn.model_selection import train_test_split

    from daskdist.testing import KillWorkerOnTask

    three_workers.wait_for_workers(3, timeout=60)  # a worker killed earlier is back
    X, y = digits
    X_train, X_test, y_train, y_test = train_test_split(X, y, test_size=0.25, random_state=0)
    # (a short timeout: a collective left waiting on a dead peer fails soon, whatever happens)
    params = dict(max_epochs=5, batch_size=24, lr=0.05, strategy="ddp", train_split=None,
                  verbose=0, random_state=0, scheduler_address=three_workers.scheduler.address,
                  module__n_features=64, module__hidden=32, module__n_outputs=10,
                  strategy__timeout=20)
    baseline = DaskNeuralNetClassifier(TinyNet, **params).fit(X_train, y_train)
    # rank 1's worker dies a moment into the third epoch's training task
    plugin = KillWorkerOnTask(r"^\('daskdist-ddp-.*-e2', \d+, 1\)$", tmp_path, delay=0.1)
    three_workers.register_plugin(plugin)
    try:
        net = DaskNeuralNetClassifier(TinyNet, **params).fit(X_train, y_train)
    finally:
        three_workers.unregister_worker_plugin(plugin.name)
    assert len(plugin.kills()) == 1
    # the other ranks' collectives failed at once; the epoch ran again from its start on a
    # group of the two workers left (one of them training the lost worker's shard too)
    assert len(net.recoveries_) >= 1  # (one, unless the restarted worker joined too early)
    recovery = net.recoveries_.iloc[0]
    assert recovery["epoch"] == 2 and recovery["round"] == 2 * len(baseline.rounds_) // 5
    # (the worker left, or, if the scheduler had not seen it leave yet, its group broke)
    assert "ddp process group" in recovery["reason"]
    assert net.rounds_["round"].tolist() == list(range(len(baseline.rounds_)))
    assert net.rounds_["samples"].sum() == baseline.rounds_["samples"].sum()
    assert baseline.score(X_test, y_test) > 0.9
    # the same steps on the same data from the same state: the same model, up to the order in
    # which the regrouped ranks add their replicas' gradients (8.9e-8 measured)
    np.testing.assert_allclose(params_vector(net.module_), params_vector(baseline.module_),
                               atol=1e-6, rtol=0)
    # no rank of a group given up is left running (or stuck in a collective) for the next test
    _assert_idle(three_workers)


@pytest.mark.timeout(180)
def test_worker_killed_mid_epoch_under_pipeline_runs_the_epoch_again(three_workers, digits,
                                                                     tmp_path):
    from sklearn.model_selection import train_test_split

    from daskdist.testing import KillWorkerOnTask, TinySequential

    three_workers.wait_for_workers(3, timeout=60)  # a worker killed earlier is back
    X, y = digits
    X_train, X_test, y_train, y_test = train_test_split(X, y, test_size=0.25, random_state=0)
    params = dict(max_epochs=4, batch_size=48, lr=0.1, strategy="pipeline", train_split=None,
                  verbose=0, random_state=0, scheduler_address=three_workers.scheduler.address,
                  module__n_features=64, module__hidden=32, module__n_outputs=10,
                  strategy__n_stages=3, strategy__n_micro_batches=2)
    baseline = DaskNeuralNetClassifier(TinySequential, **params).fit(X_train, y_train)
    # the worker of the middle stage dies as it starts the fifth step of the third epoch
    steps = len(baseline.rounds_) // 4
    plugin = KillWorkerOnTask(
        rf"^\('daskdist-stage-forward-.*-e2', {2 * steps + 4}, 0, 1, 0\)$", tmp_path)
    three_workers.register_plugin(plugin)
    try:
        net = DaskNeuralNetClassifier(TinySequential, **params).fit(X_train, y_train)
    finally:
        three_workers.unregister_worker_plugin(plugin.name)
    assert len(plugin.kills()) == 1
    # the epoch ran again from its start, its stages on the two workers left
    assert len(net.recoveries_) >= 1  # (one, unless the restarted worker joined too early)
    recovery = net.recoveries_.iloc[0]
    assert recovery["epoch"] == 2 and recovery["round"] == 2 * steps
    assert 0 <= recovery["rounds_lost"] <= 4
    assert net.rounds_["round"].tolist() == list(range(len(baseline.rounds_)))
    # the same steps on the same data from the same state: the same model
    np.testing.assert_allclose(params_vector(net.module_), params_vector(baseline.module_),
                               atol=1e-5)
    assert baseline.score(X_test, y_test) > 0.9
    # no rank of a group given up is left running (or stuck in a collective) for the next test
    _assert_idle(three_workers)


@pytest.mark.timeout(240)
def test_a_stage_lost_with_its_worker_comes_back_from_the_last_sharded_checkpoint(
        three_workers, digits, tmp_path):
    """Stages built on their workers recover from the checkpoint of their epoch's start."""
    from daskdist.callbacks import Checkpoint
    from daskdist.errors import StagesLost
    from daskdist.testing import KillWorkerOnTask, TinySequential

    three_workers.wait_for_workers(3, timeout=60)  # a worker killed earlier is back
    X, y = digits
    params = dict(max_epochs=3, batch_size=64, lr=0.1, strategy="pipeline", train_split=None,
                  verbose=0, random_state=0, scheduler_address=three_workers.scheduler.address,
                  module__n_features=64, module__hidden=32, module__n_outputs=10,
                  optimizer__momentum=0.9, strategy__build="workers", strategy__n_stages=2,
                  strategy__n_micro_batches=2)
    baseline = DaskNeuralNetClassifier(TinySequential, **params).fit(X, y)
    with pytest.warns(UserWarning):
        expected = params_vector(baseline.gather_module())
    baseline.release_stages()
    steps = len(baseline.rounds_) // 3

    def killing(at_round, sentinels):
        (tmp_path / sentinels).mkdir()
        return KillWorkerOnTask(
            rf"^\('daskdist-stage-forward-.*-e1', {at_round}, 0, 1, 0\)$", tmp_path / sentinels)

    # the worker of the last stage dies in the middle of the second epoch
    plugin = killing(steps + 3, "first")
    three_workers.register_plugin(plugin)
    try:
        net = DaskNeuralNetClassifier(TinySequential, callbacks=[("ck", Checkpoint(
            tmp_path / "ck"))], **params).fit(X, y)
    finally:
        three_workers.unregister_worker_plugin(plugin.name)
    assert len(plugin.kills()) == 1
    assert len(net.recoveries_) >= 1 and net.recoveries_.iloc[0]["epoch"] == 1
    assert net.rounds_["round"].tolist() == list(range(len(baseline.rounds_)))
    # both stages came back from the files of epoch 1's start: the fit ends where one
    # that lost nothing does
    with pytest.warns(UserWarning):
        np.testing.assert_allclose(params_vector(net.gather_module()), expected, atol=1e-5)
    net.release_stages()

    # without a checkpoint of the epoch's start nothing holds the lost stage
    three_workers.wait_for_workers(3, timeout=60)
    plugin = killing(steps + 3, "second")
    three_workers.register_plugin(plugin)
    try:
        with pytest.raises(StagesLost, match="no checkpoint was saved at the start"):
            DaskNeuralNetClassifier(TinySequential, **params).fit(X, y)
    finally:
        three_workers.unregister_worker_plugin(plugin.name)
    _assert_idle(three_workers)


@pytest.mark.timeout(180)
@pytest.mark.parametrize("kind, strategy", [("numpy", "async"), ("dask", "ssp"),
                                            ("numpy", "local_sgd-deadline")])
def test_worker_killed_under_async_updates_applies_each_update_once(three_workers, digits,
                                                                    tmp_path, kind, strategy):
    from daskdist.testing import KillWorkerOnTask

    three_workers.wait_for_workers(3, timeout=60)  # a worker killed earlier is back
    X, y = digits
    Xin = da.from_array(X, chunks=300) if kind == "dask" else X
    # replica 1 dies in its tenth round, in the second of four epochs
    plugin = KillWorkerOnTask(r"^\('daskdist-round-.*', 10, 1\)$", tmp_path)
    three_workers.register_plugin(plugin)
    try:
        net = DaskNeuralNetClassifier(
            TinyNet, module__n_features=64, module__hidden=32, module__n_outputs=10,
            max_epochs=4, batch_size=96, lr=0.3, strategy=strategy.split("-")[0], sync_every=2,
            **({"strategy__deadline": 2.0} if strategy.endswith("deadline") else {}),
            train_split=None, verbose=0, random_state=0,
            scheduler_address=three_workers.scheduler.address).fit(Xin, y)
    finally:
        three_workers.unregister_worker_plugin(plugin.name)
    assert len(plugin.kills()) == 1
    rounds = net.rounds_
    assert rounds["round"].tolist() == list(range(len(rounds)))  # each update applied once
    assert (rounds.groupby("epoch")["samples"].sum() >= len(X)).all()  # no epoch cut short
    if kind == "numpy":  # the shard on the dead worker is sent again, from the newest state
        assert len(net.recoveries_) == 1 and net.recoveries_["rounds_lost"].max() <= 1
    assert net.score(X, y) > 0.9


@pytest.mark.timeout(120)
def test_a_worker_killed_again_while_its_nanny_restarts_it_comes_back():
    """distributed's own LocalCluster closes the nanny of a worker that is gone when
    ``lost-worker-timeout`` runs out after a removal, even when that is the nanny's second
    restart of it (or its restart is slow): the cluster stays a worker short for good."""
    timeout = 8.0
    with dask.config.set({"distributed.deploy.lost-worker-timeout": f"{timeout}s"}):
        cluster = embedded_cluster(n_workers=1)
        try:
            with Client(cluster, set_as_default=False) as client:
                client.wait_for_workers(1, timeout=60)
                first = time.monotonic()
                for when in (first, first + timeout - 0.5):  # the second kill lands just
                    time.sleep(max(0.0, when - time.monotonic()))  # before the first
                    killed = _kill_a_worker(client)  # removal's timer runs out
                    deadline = time.monotonic() + 60
                    while set(client.scheduler_info(n_workers=-1)["workers"]) in (set(),
                                                                                  {killed}):
                        assert time.monotonic() < deadline, "the worker did not come back"
                        time.sleep(0.2)
                time.sleep(timeout + 1)  # every removal's timer has run out
                assert len(cluster.workers) == 1
                client.wait_for_workers(1, timeout=10)
        finally:
            cluster.close()


@pytest.mark.timeout(180)
@pytest.mark.parametrize("kind", ["dask", "stream"])
def test_every_worker_killed_at_once_the_fit_recomputes_and_goes_on(tmp_path, kind):
    """The only worker dies mid-epoch: the source chunks and rounds are recomputed on its
    replacement, although the scheduler would keep them waiting for the dead worker."""
    from daskdist.testing import KillWorkerOnTask

    X, y = make_classification(1000)
    Xin = da.from_array(X, chunks=250)
    params = dict(max_epochs=2, sync_every=2, iterator_train__shuffle=True,
                  streaming=kind == "stream", buffer_chunks=2)
    cluster = embedded_cluster(n_workers=1)
    try:
        with Client(cluster, set_as_default=False) as client:
            baseline = _net(client, **params).fit(Xin, y)
            victim = len(baseline.rounds_) // 2
            plugin = KillWorkerOnTask(rf"^\('daskdist-round-.*', {victim}, 0\)$", tmp_path)
            client.register_plugin(plugin)
            net = _net(client, **params).fit(Xin, y)
            assert len(plugin.kills()) == 1
    finally:
        cluster.close()
    assert net.rounds_["round"].tolist() == list(range(len(baseline.rounds_)))
    # recomputed from lineage, round by round: the same run as the fault-free one
    np.testing.assert_array_equal(params_vector(net.module_), params_vector(baseline.module_))


@pytest.mark.timeout(120)
def test_hung_worker_is_removed_and_the_fit_goes_on(tmp_path):
    from daskdist.testing import KillWorkerOnTask

    X, y = make_classification(1200)
    # a short heartbeat TTL, so that the scheduler gives up on the hung worker soon
    with dask.config.set({"distributed.scheduler.worker-ttl": "8s"}):
        cluster = embedded_cluster(n_workers=2)
    plugin = KillWorkerOnTask(r"^\('daskdist-round-.*', 6, 1\)$", tmp_path, hang=True)
    try:
        with Client(cluster, set_as_default=False) as client:
            # import torch before the fit: an import in a worker's event loop can
            # hold up its heartbeats for seconds on a busy machine
            client.run(__import__, "daskdist.worker.replica")
            client.register_plugin(plugin)
            t0 = time.perf_counter()
            net = _net(client, max_epochs=3, sync_every=1).fit(X, y)
            elapsed = time.perf_counter() - t0
            assert len(plugin.kills()) == 1
            assert len(net.history) == 3
            assert net.rounds_["round"].tolist() == list(range(len(net.rounds_)))
            assert len(net.recoveries_) == 1 and net.recoveries_["rounds_lost"].max() <= 1
            assert elapsed < 60
    finally:
        for pid, _ in plugin.kills():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        cluster.close()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind, task", [("numpy", "round"), ("dask", "round"),
                                        ("numpy", "shard")])
def test_poison_shard_stops_the_fit_with_an_error_naming_it(poison_client, tmp_path, kind,
                                                           task):
    from distributed import KilledWorker

    from daskdist import ShardFailedError
    from daskdist.testing import KillWorkerOnTask

    X, y = make_classification(1200)
    Xin = da.from_array(X, chunks=200) if kind == "dask" else X
    poison_client.wait_for_workers(2, timeout=60)  # workers killed earlier are back
    # every worker that starts a task of shard 1 dies
    plugin = KillWorkerOnTask(rf"^\('daskdist-{task}-.*', (\d+, )?1\)$", tmp_path, times=20)
    poison_client.register_plugin(plugin)
    t0 = time.perf_counter()
    try:
        with dask.config.set({"distributed.scheduler.allowed-failures": ALLOWED_FAILURES}):
            with pytest.raises(ShardFailedError, match="shard 1") as info:
                _net(poison_client, sync_every=1, n_replicas=2).fit(Xin, y)
    finally:
        poison_client.unregister_worker_plugin(plugin.name)
    assert time.perf_counter() - t0 < 90
    assert info.value.replica == 1
    assert len(plugin.kills()) == ALLOWED_FAILURES + 1
    if kind == "dask":  # Dask's own verdict is the cause
        assert isinstance(info.value.__cause__, KilledWorker)
    # the client and the cluster stay usable
    poison_client.wait_for_workers(2, timeout=30)
    assert poison_client.submit(sum, [1, 2]).result(timeout=30) == 3


class RetireDuringEpoch(Callback):
    """Retire one worker gracefully while the epoch after ``epoch`` runs."""

    def __init__(self, client, epoch=1, delay=0.2):
        self.client, self.epoch, self.delay = client, epoch, delay
        self.retired = None

    def on_epoch_end(self, net, **kwargs):
        if len(net.history) == self.epoch:
            address = sorted(self.client.scheduler_info(n_workers=-1)["workers"])[-1]
            self.timer = threading.Timer(self.delay, self._retire, [address])
            self.timer.start()

    def _retire(self, address):
        self.retired = self.client.retire_workers([address], close_workers=True)


@pytest.mark.timeout(180)
@pytest.mark.parametrize("kind", ["numpy", "dask"])
def test_a_gracefully_retired_worker_is_a_planned_departure(digits, kind):
    """A scale-down moves the worker's data first: no recovery, no lost round, same result.

    With ``elastic=False``, so that the replicas stay as they were; an elastic
    fit merges the departed replica at the next epoch boundary
    (``tests/test_elastic.py``).
    """
    X, y = digits
    Xin = da.from_array(X, chunks=450) if kind == "dask" else X
    cluster = embedded_cluster(n_workers=3)
    try:
        with Client(cluster, set_as_default=False) as client:
            params = dict(max_epochs=4, batch_size=96, lr=0.2, strategy="local_sgd",
                          sync_every=2, train_split=None, verbose=0, random_state=0,
                          scheduler_address=client.scheduler.address,
                          module__n_features=64, module__hidden=32, module__n_outputs=10,
                          elastic=False)
            baseline = DaskNeuralNetClassifier(TinyNet, **params).fit(Xin, y)
            retire = RetireDuringEpoch(client)
            net = DaskNeuralNetClassifier(TinyNet, callbacks=[retire], **params).fit(Xin, y)
            retire.timer.join()
            assert retire.retired  # the worker left ...
            assert len(client.scheduler_info(n_workers=-1)["workers"]) == 2
    finally:
        cluster.close()
    assert net.recoveries_.empty  # ... as planned: nothing to recover
    assert net.rounds_["round"].tolist() == list(range(len(baseline.rounds_)))
    assert net.rounds_["replicas"].tolist() == baseline.rounds_["replicas"].tolist()
    np.testing.assert_array_equal(params_vector(net.module_), params_vector(baseline.module_))
