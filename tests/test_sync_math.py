"""The data-parallel maths: distributed rounds equal single-process training."""

import numpy as np
import pytest
import torch
from skorch import NeuralNetClassifier

from daskdist import DaskNeuralNetClassifier
from daskdist.state import params_vector
from daskdist.testing import TinyNet

COMMON = dict(max_epochs=3, lr=0.1, batch_size=32, train_split=None, verbose=0,
              optimizer=torch.optim.SGD, optimizer__momentum=0.9)


def _dask_net(**kwargs):
    # random_state=None: the weights come from torch's RNG, seeded as for the reference
    params = {**COMMON, "sharding": "sequential", "random_state": None, **kwargs}
    return DaskNeuralNetClassifier(TinyNet, **params)


def test_sync_with_one_replica_equals_plain_skorch(client, tiny_data):
    X, y = tiny_data
    torch.manual_seed(0)
    reference = NeuralNetClassifier(TinyNet, **COMMON).fit(X, y)
    torch.manual_seed(0)
    net = _dask_net(strategy="sync", n_replicas=1).fit(X, y)
    ours, theirs = params_vector(net.module_), params_vector(reference.module_)
    assert not np.allclose(ours, params_vector(TinyNet()), atol=1e-3)  # it trained
    np.testing.assert_allclose(ours, theirs, atol=1e-6, rtol=0)
    np.testing.assert_allclose(net.history[:, "train_loss"], reference.history[:, "train_loss"],
                               rtol=1e-5)


def _combined_batch_sgd(X, y, n_replicas, batch_size, epochs, lr, momentum):
    """Single-process SGD where step t's batch is the union of every replica's t-th batch."""
    torch.manual_seed(0)
    module = TinyNet()
    opt = torch.optim.SGD(module.parameters(), lr=lr, momentum=momentum)
    shards = np.array_split(np.arange(len(X)), n_replicas)
    per_replica = batch_size // n_replicas
    steps = max(int(np.ceil(len(s) / per_replica)) for s in shards)
    n_steps = 0
    for _ in range(epochs):
        for t in range(steps):
            rows = np.concatenate([s[t * per_replica:(t + 1) * per_replica] for s in shards])
            opt.zero_grad()
            out = module(torch.from_numpy(X[rows]))
            loss = torch.nn.functional.nll_loss(torch.log(out + torch.finfo(out.dtype).eps),
                                                torch.from_numpy(y[rows]))
            loss.backward()
            opt.step()
            n_steps += 1
    return params_vector(module), n_steps


@pytest.mark.parametrize("n_replicas", [2, 4])
def test_sync_equals_single_process_sgd_on_the_combined_batch(client, tiny_data, n_replicas):
    X, y = tiny_data
    expected, n_steps = _combined_batch_sgd(X, y, n_replicas, 32, 3, 0.1, 0.9)
    assert n_steps >= 20
    torch.manual_seed(0)
    net = _dask_net(strategy="sync", n_replicas=n_replicas).fit(X, y)
    assert net.rounds_["round"].size == n_steps
    assert set(net.rounds_["replicas"].iloc[0]) == set(range(n_replicas))
    np.testing.assert_allclose(params_vector(net.module_), expected, atol=1e-5, rtol=0)


def test_local_sgd_with_sync_every_1_equals_sync(client, tiny_data):
    X, y = tiny_data
    plain = {"optimizer__momentum": 0.0}
    torch.manual_seed(0)
    sync = _dask_net(strategy="sync", n_replicas=2, **plain).fit(X, y)
    torch.manual_seed(0)
    local = _dask_net(strategy="local_sgd", sync_every=1, n_replicas=2, **plain).fit(X, y)
    np.testing.assert_allclose(params_vector(local.module_), params_vector(sync.module_),
                               atol=1e-5, rtol=0)
    assert len(local.rounds_) == len(sync.rounds_)


def test_local_sgd_averages_every_sync_every_steps(client, tiny_data):
    X, y = tiny_data
    net = _dask_net(strategy="local_sgd", sync_every=3, n_replicas=2, max_epochs=2).fit(X, y)
    # 120 samples per replica, 16 per step: 8 steps per epoch -> rounds of 3, 3, 2
    assert net.history[:, "rounds"] == [3, 3]
    assert net.rounds_["samples"].tolist() == [96, 96, 48] * 2
    assert (net.rounds_["bytes"] > 0).all()


def test_sync_with_uneven_shards_weights_by_sample_count(client, tiny_data):
    X, y = tiny_data[0][:230], tiny_data[1][:230]  # shards of 77, 77 and 76 samples
    expected, n_steps = _combined_batch_sgd(X, y, 3, 30, 3, 0.1, 0.9)
    torch.manual_seed(0)
    net = _dask_net(strategy="sync", n_replicas=3, batch_size=30).fit(X, y)
    assert net.rounds_["round"].size == n_steps
    # the last step of an epoch has 7 + 7 + 6 samples: unequal weights
    assert net.rounds_["samples"].iloc[n_steps // 3 - 1] == 20
    np.testing.assert_allclose(params_vector(net.module_), expected, atol=1e-5, rtol=0)
