"""``ddp``: torch DistributedDataParallel in a process group that Dask forms (gloo here)."""

import numpy as np
import pytest
from distributed import Client, LocalCluster
from skorch.callbacks import Callback

from daskdist import DaskNeuralNetClassifier
from daskdist.state import params_vector
from daskdist.strategies import DDP
from daskdist.strategies.ddp import rank_layout
from daskdist.testing import FailOnLargeInput, TinyNet, make_classification


def _net(client, strategy, module=TinyNet, **kwargs):
    params = dict(max_epochs=2, lr=0.05, batch_size=64, optimizer__momentum=0.9,
                  iterator_train__shuffle=True, strategy=strategy, train_split=None, verbose=0,
                  random_state=0, scheduler_address=client.scheduler.address)
    return DaskNeuralNetClassifier(module, **{**params, **kwargs})


@pytest.mark.parametrize("batch_size, n_replicas, epochs", [
    (64, None, 2),  # one replica per worker: each worker is one rank
    (5, None, 1),  # slices of 3 and 2 rows: replica 0's shard runs out first (DDP's join)
    (64, 4, 2),  # two replicas per worker: each rank trains both slices as one batch
])
def test_ddp_equals_sync(client, batch_size, n_replicas, epochs):
    X, y = make_classification(600)
    kwargs = dict(batch_size=batch_size, n_replicas=n_replicas, max_epochs=epochs)
    sync = _net(client, "sync", **kwargs).fit(X, y)
    ddp = _net(client, "ddp", **kwargs).fit(X, y)
    np.testing.assert_allclose(params_vector(ddp.module_), params_vector(sync.module_),
                               atol=1e-5)
    np.testing.assert_allclose(ddp.history[:, "train_loss"], sync.history[:, "train_loss"],
                               rtol=1e-5)
    # one row per step, as under sync: the same rounds, replicas and rows
    for column in ("round", "epoch", "replicas", "samples"):
        assert ddp.rounds_[column].tolist() == sync.rounds_[column].tolist()
    np.testing.assert_allclose(ddp.rounds_["loss"], sync.rounds_["loss"], rtol=1e-4)
    # a step moves the ring allreduce of the gradient, 2 (W - 1) times its bytes (W = 2);
    # an epoch's first also the starting state, fetched by the other rank
    grad = 4 * sum(p.numel() for p in ddp.module_.parameters())
    rounds = ddp.rounds_
    first = rounds["round"] == rounds.groupby("epoch")["round"].transform("min")
    assert (rounds["bytes"][~first] == 2 * grad).all()
    assert (rounds["bytes"][first] > 2 * grad).all()
    assert ddp.rounds_["sync_s"].isna().all() and (ddp.rounds_["compute_s"] > 0).all()


def test_ddp_learns_digits_and_keeps_its_group_between_epochs(client, digits):
    X, y = digits
    net = _net(client, "ddp", max_epochs=4, lr=0.1, batch_size=64,
               module__n_features=64, module__hidden=32, module__n_outputs=10).fit(X, y)
    assert net.score(X, y) > 0.9
    assert net.rounds_["round"].tolist() == list(range(len(net.rounds_)))
    # the group of the fit is gone with it: the workers can join the next one
    groups = client.run(_current_group)
    assert set(groups.values()) == {None}


class ForgetOneReplica(Callback):
    """Drop the cached replicas of one worker after each epoch (as if it had rebuilt them)."""

    def __init__(self, client):
        self.client = client

    def on_epoch_end(self, net, **kwargs):
        worker = sorted(self.client.scheduler_info()["workers"])[0]
        self.client.run(_clear_replica_cache, workers=[worker])


def _clear_replica_cache():
    from daskdist.worker import replica

    replica._cache.clear()


def test_ddp_ranks_agree_to_wrap_a_rebuilt_module_again(client):
    X, y = make_classification(600)
    kwargs = dict(max_epochs=3, strategy__timeout=20)
    plain = _net(client, "ddp", **kwargs).fit(X, y)
    # one rank's module is new each epoch: building DDP is a collective, so both ranks must
    # build it again (or they would wait for each other until the timeout)
    net = _net(client, "ddp", callbacks=[("forget", ForgetOneReplica(client))],
               **kwargs).fit(X, y)
    assert net.recoveries_.empty
    np.testing.assert_allclose(params_vector(net.module_), params_vector(plain.module_),
                               atol=1e-6)


def test_ddp_reports_its_progress_while_an_epoch_runs(client, digits):
    from daskdist.dashboard.events import TOPIC

    X, y = digits
    events = []
    client.subscribe_topic(TOPIC, lambda event: events.append(event[1]))
    try:
        net = _net(client, "ddp", max_epochs=1, batch_size=16, module__n_features=64,
                   module__hidden=32, module__n_outputs=10).fit(X, y)
    finally:
        client.unsubscribe_topic(TOPIC)
    rounds = [e for e in events if e.get("kind") == "round"]  # (this fit's: the only one)
    assert rounds and rounds[-1]["round"] == len(net.rounds_) - 1  # the last step, at least
    assert all(e["samples"] > 0 for e in rounds)


def test_ddp_raises_a_replicas_own_error_rather_than_the_broken_group(client):
    X, y = make_classification(400)
    X[250] = 1e4  # on replica 1's shard only (sequential shards of 200)
    net = _net(client, "ddp", module=FailOnLargeInput, sharding="sequential",
               strategy__timeout=5)
    with pytest.raises(ValueError, match="input too large"):
        net.fit(X, y)
    # rank 0 waited in its allreduce until the timeout; then the workers take the next fit
    net = _net(client, "ddp", max_epochs=1).fit(X[:200], y[:200])
    assert np.isfinite(net.history[-1, "train_loss"])


def test_rank_layout_puts_each_workers_replicas_in_one_rank():
    assert rank_layout(["b", "a", "b", "c", "a"]) == [("b", (0, 2)), ("a", (1, 4)),
                                                      ("c", (3,))]


def test_ddp_options_are_checked():
    with pytest.raises(ValueError, match="backend"):
        DDP(backend="mpi")
    with pytest.raises(ValueError, match="timeout"):
        DDP(timeout=0)
    assert DDP().backend_for("cpu") == "gloo"
    assert DDP().backend_for("cuda:1") == "nccl"
    assert DDP(backend="gloo").backend_for("cuda") == "gloo"
    assert DDP().ddp_options("cuda:1")["device_ids"] == [1]
    assert "device_ids" not in DDP().ddp_options("cpu")
    # NCCL only when every rank trains on CUDA (a worker that fell back to its CPU: gloo)
    assert DDP().backend_for(["cuda:0", "cuda:1"]) == "nccl"
    assert DDP().backend_for(["cuda:0", "cpu"]) == "gloo"
    with pytest.raises(ValueError, match="allow_insecure"):
        DDP().check_replicas(["tls://10.0.0.1:4000", "tls://10.0.0.2:4000"])
    DDP(allow_insecure=True).check_replicas(["tls://10.0.0.1:4000"])


def test_ddp_refuses_workers_that_share_a_process():
    X, y = make_classification(100)
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False,
                      dashboard_address=None) as cluster, Client(cluster) as client:
        net = _net(client, "ddp", max_epochs=1)
        with pytest.raises(ValueError, match="process of its own"):
            net.fit(X, y)


def _current_group():
    from daskdist.worker import process_group

    return process_group.current()


def _pretend_pid(pid):
    """Make this worker process's ``os.getpid`` answer ``pid`` (None: undo)."""
    import os

    real = os.__dict__.setdefault("_daskdist_test_real_getpid", os.getpid)
    os.getpid = real if pid is None else (lambda: pid)
    return real()


def test_ddp_accepts_processes_on_other_hosts_with_the_same_pid(client):
    # containers on different hosts commonly run their worker as the same pid (7): a pid
    # is not a process's identity across a cluster
    pids = client.run(_pretend_pid, 7)
    assert len(set(pids.values())) == 2 and set(client.run(_os_getpid).values()) == {7}
    try:
        X, y = make_classification(200)
        net = _net(client, "ddp", max_epochs=1).fit(X, y)
        assert len(net.history) == 1
    finally:
        client.run(_pretend_pid, None)
    assert set(client.run(_os_getpid).values()) == set(pids.values())


def _os_getpid():
    import os

    return os.getpid()
