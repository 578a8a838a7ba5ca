"""Rounds' states survive memory pressure: Dask spills, moves and pickles them, and no round has
to run again for it (``daskdist.worker.runtime`` keeps each replica's newest states)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import dask
import numpy as np
import pytest
from distributed import Client

from daskdist import MLP, DaskNeuralNetClassifier
from daskdist.clusters.embedded import embedded_cluster
from daskdist.state import params_vector

# MLP 64-512-512-10: 300k parameters, 1.2 MB a copy (2.4 MB with momentum); 4 replicas on 2
# workers, 8 rounds in flight: far above the 6 MB of managed memory kept before spilling
_FITS = {
    "sync": dict(strategy="sync"),
    "local_sgd-topk": dict(strategy="local_sgd", sync_every=2, strategy__compression="topk",
                           strategy__density=0.1),
    "local_sgd": dict(strategy="local_sgd", sync_every=2),
}


@pytest.fixture(scope="module")
def tight_client():
    """Two workers that spill whatever passes 6 MB of managed memory (and never pause)."""
    with dask.config.set({"distributed.worker.memory.target": 0.003,
                          "distributed.worker.memory.spill": False,
                          "distributed.worker.memory.pause": False,
                          "distributed.worker.memory.terminate": False}):
        cluster = embedded_cluster(n_workers=2, memory_limit="2GiB")
    client = Client(cluster, set_as_default=False)
    yield client
    client.close()
    cluster.close()


def _net(address, **kwargs):
    return DaskNeuralNetClassifier(
        MLP, module__hidden=(512, 512), lr=0.05, batch_size=64, max_epochs=2, n_replicas=4,
        optimizer__momentum=0.9, train_split=None, verbose=0, random_state=0,
        scheduler_address=address, **kwargs)


def _spilled_bytes(dask_worker) -> float:
    return dask_worker.data.cumulative_metrics[("disk-write", "bytes")]


@pytest.mark.timeout(300)
def test_spilled_and_moved_states_make_no_round_run_again(client, tight_client, digits):
    X, y = digits
    session = client.scheduler.address
    baseline = {name: _net(session, **kw).fit(X, y) for name, kw in _FITS.items()}

    before = tight_client.run(_spilled_bytes)
    address = tight_client.scheduler.address
    # three fits on one cluster at once, sharing its workers and their memory
    with ThreadPoolExecutor(len(_FITS)) as pool:
        futures = {name: pool.submit(_net(address, **kw).fit, X, y)
                   for name, kw in _FITS.items()}
        fitted = {name: f.result() for name, f in futures.items()}
    spilled = {w: b - before[w] for w, b in tight_client.run(_spilled_bytes).items()}
    assert all(b > 0 for b in spilled.values()), spilled  # every worker spilled

    for name, net in fitted.items():
        assert len(net.recoveries_) == 0, (name, net.recoveries_)
        assert net.rounds_["round"].tolist() == baseline[name].rounds_["round"].tolist()
        # spilling alone changes nothing: the fit under pressure is the fit without
        np.testing.assert_array_equal(params_vector(net.module_),
                                      params_vector(baseline[name].module_), err_msg=name)
