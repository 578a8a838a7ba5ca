"""A worker killed during a fit does not hang it (full guarantees: fault-tolerance work)."""

import os
import signal
import threading
import time

import dask.array as da
import numpy as np
import pytest
from distributed import Client
from skorch.callbacks import Callback

from daskdist import DaskNeuralNetClassifier
from daskdist.clients import embedded_cluster
from daskdist.testing import TinyNet, make_classification


@pytest.fixture(scope="module")
def fault_client():
    """A cluster of its own: these tests kill its workers (the nanny restarts them)."""
    cluster = embedded_cluster(n_workers=2)
    client = Client(cluster, set_as_default=False)
    yield client
    client.close()
    cluster.close()


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
                                            ("numpy", "sync")])
def test_worker_killed_between_rounds(fault_client, kind, strategy):
    X, y = make_classification(3000)
    Xin = da.from_array(X, chunks=500) if kind == "dask" else X
    net = _net(fault_client, max_epochs=4, sync_every=1, strategy=strategy)
    killed = []
    killer = threading.Timer(1.0, lambda: killed.append((_kill_a_worker(fault_client),
                                                          time.perf_counter())))
    killer.start()
    try:
        net.fit(Xin, y)
    finally:
        killer.cancel()
    finished = time.perf_counter()
    assert killed and killed[0][1] < finished  # the worker died while the fit ran
    assert len(net.history) == 4
    assert np.isfinite(net.history[-1, "train_loss"])
    assert net.score(X, y) > 0.6
