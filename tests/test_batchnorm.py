"""BatchNorm across replicas: running statistics of the combined batch, synchronised BatchNorm.

The data are sorted by class, and each class shifted, before sequential
sharding, so that the replicas' slices differ and a plain mean of their running
variances is measurably wrong.
"""

import copy
import math
import warnings

import numpy as np
import pytest
import torch

from daskdist import DaskNeuralNetClassifier, ReplicaDriftWarning
from daskdist.state import buffers_to_numpy, params_vector, tree_weighted_sum
from daskdist.testing import TinyBatchNormNet
from daskdist.worker.batchnorm import combine_step, count_rows, pooled, running_moments

LR = 0.1
EPOCHS = 2


@pytest.fixture
def sorted_data(tiny_data):
    X, y = tiny_data
    order = np.argsort(y, kind="stable")
    X, y = X[order], y[order]
    return (X + 1.5 * y[:, None]).astype(np.float32), y


def _net(**kwargs):
    params = {**dict(max_epochs=EPOCHS, lr=LR, batch_size=32, train_split=None, verbose=0,
                     sharding="sequential", random_state=None, n_replicas=2,
                     optimizer__momentum=0.9), **kwargs}
    torch.manual_seed(0)
    return DaskNeuralNetClassifier(TinyBatchNormNet, **params)


def _loss(module, X, y):
    out = module(torch.from_numpy(X))
    return torch.nn.functional.nll_loss(torch.log(out + torch.finfo(out.dtype).eps),
                                        torch.from_numpy(y))


def _combined_batch(X, y, replicas=2, batch_size=32, per_slice=True):
    """Single-process SGD on every replica's t-th batch at once.

    ``per_slice``: BatchNorm as under ``sync``: in the forward pass each
    replica's slice is normalised on its own (the gradient is the slices'
    mean gradient); the running statistics move as those of the combined
    batch. Otherwise plain training on the combined batch.
    """
    torch.manual_seed(0)
    module = TinyBatchNormNet()
    bn = module.net[1]
    opt = torch.optim.SGD(module.parameters(), lr=LR, momentum=0.9)
    shards = np.array_split(np.arange(len(X)), replicas)
    per = batch_size // replicas
    for _ in range(EPOCHS):
        for t in range(max(math.ceil(len(s) / per) for s in shards)):
            slices = [s[t * per:(t + 1) * per] for s in shards]
            rows = np.concatenate(slices)
            opt.zero_grad()
            if not per_slice:
                _loss(module, X[rows], y[rows]).backward()
                opt.step()
                continue
            for part in slices:
                replica = copy.deepcopy(module)
                (_loss(replica, X[part], y[part]) * (len(part) / len(rows))).backward()
                for p, q in zip(module.parameters(), replica.parameters()):
                    p.grad = q.grad if p.grad is None else p.grad + q.grad
            with torch.no_grad():
                z = module.net[0](torch.from_numpy(X[rows]))
                bn.running_mean.mul_(1 - bn.momentum).add_(bn.momentum * z.mean(0))
                bn.running_var.mul_(1 - bn.momentum).add_(bn.momentum * z.var(0))
                bn.num_batches_tracked += 1
            opt.step()
    return module


@pytest.mark.parametrize("momentum", [0.1, None])
def test_combine_step_gives_the_combined_batchs_running_statistics(sorted_data, momentum):
    X, _ = sorted_data
    torch.manual_seed(0)
    module = TinyBatchNormNet(momentum=momentum).train()
    module(torch.from_numpy(X[:40]))  # running statistics away from their initial values
    start = buffers_to_numpy(module)
    slices = [X[:30], X[-50:]]  # different sizes, far apart
    after, counts = [], []
    for part in slices:
        replica = copy.deepcopy(module)
        with count_rows(replica, {}) as rows:
            replica(torch.from_numpy(part))
        after.append(buffers_to_numpy(replica))
        counts.append(rows)
    assert counts == [{"net.1": 30}, {"net.1": 50}]
    whole = copy.deepcopy(module)
    whole(torch.from_numpy(np.concatenate(slices)))
    expected = buffers_to_numpy(whole)
    combined = combine_step(module, start, after, counts, [30 / 80, 50 / 80])
    for key in ("net.1.running_mean", "net.1.running_var"):
        np.testing.assert_allclose(combined[key], expected[key], rtol=1e-5, atol=1e-6)
    plain = tree_weighted_sum(after, [30 / 80, 50 / 80])["net.1.running_var"]
    assert not np.allclose(plain, expected["net.1.running_var"], rtol=1e-2)
    assert combined["net.1.num_batches_tracked"] == expected["net.1.num_batches_tracked"]


def test_pooled_variances_are_those_of_the_replicas_mixture(sorted_data):
    X, _ = sorted_data
    torch.manual_seed(0)
    replicas = [TinyBatchNormNet(momentum=None).train() for _ in range(2)]
    for replica, part in zip(replicas, [X[:60], X[-90:]]):
        replica(torch.from_numpy(part))  # momentum None: the running statistics are the slice's
    weights = [0.4, 0.6]
    mean = tree_weighted_sum([buffers_to_numpy(r) for r in replicas], weights)
    out = pooled(mean, tree_weighted_sum([running_moments(r) for r in replicas], weights))
    means = [r.net[1].running_mean.double().numpy() for r in replicas]
    vars_ = [r.net[1].running_var.double().numpy() for r in replicas]
    mixture_mean = sum(w * m for w, m in zip(weights, means))
    mixture_var = sum(w * (v + (m - mixture_mean) ** 2) for w, v, m in zip(weights, vars_, means))
    np.testing.assert_allclose(out["net.1.running_var"], mixture_var, rtol=1e-5)
    assert not np.allclose(mean["net.1.running_var"], mixture_var, rtol=1e-2)


def test_sync_with_batchnorm_equals_single_process_on_the_combined_batch(client, sorted_data):
    X, y = sorted_data
    reference = _combined_batch(X, y)
    net = _net(strategy="sync").fit(X, y)
    np.testing.assert_allclose(params_vector(net.module_), params_vector(reference),
                               atol=1e-5, rtol=0)
    ours, theirs = buffers_to_numpy(net.module_), buffers_to_numpy(reference)
    for key in ("net.1.running_mean", "net.1.running_var"):
        np.testing.assert_allclose(ours[key], theirs[key], rtol=1e-4, atol=1e-5, err_msg=key)


@pytest.mark.parametrize("strategy", ["local_sgd", "hierarchical", "local_sgd-topk"])
def test_parameter_averaging_pools_the_replicas_running_variances(client, sorted_data,
                                                                  strategy):
    X, y = sorted_data
    # lr=0: parameters stay, so each replica's running statistics are those of its own shard
    # under the initial weights, and the pooled result can be computed here
    params = dict(lr=0.0, max_epochs=1, sync_every=100, n_replicas=2)
    if strategy == "hierarchical":
        params.update(n_replicas=4, strategy__groups=[[0, 1], [2, 3]])
    if strategy.endswith("topk"):
        params.update(strategy__compression="topk", strategy__density=0.5)
    net = _net(strategy=strategy.split("-")[0], **params).fit(X, y)
    torch.manual_seed(0)
    start = TinyBatchNormNet().train()
    replicas, weights = [], []
    for shard in np.array_split(np.arange(len(X)), params["n_replicas"]):
        replica = copy.deepcopy(start)
        per = 32 // params["n_replicas"]
        with torch.no_grad():
            for t in range(0, len(shard), per):
                replica(torch.from_numpy(X[shard[t:t + per]]))
        replicas.append(replica)
        weights.append(len(shard) / len(X))
    mean = tree_weighted_sum([buffers_to_numpy(r) for r in replicas], weights)
    expected = pooled(mean, tree_weighted_sum([running_moments(r) for r in replicas], weights))
    ours = buffers_to_numpy(net.module_)
    for key in ("net.1.running_mean", "net.1.running_var"):
        np.testing.assert_allclose(ours[key], expected[key], rtol=1e-4, atol=1e-6, err_msg=key)
    assert not np.allclose(ours["net.1.running_var"], mean["net.1.running_var"], rtol=1e-2)


def test_ddp_with_sync_batchnorm_equals_single_process_on_the_combined_batch(client,
                                                                             sorted_data):
    X, y = sorted_data
    reference = _combined_batch(X, y, per_slice=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ReplicaDriftWarning)  # the ranks' copies agree
        net = _net(strategy="ddp", strategy__sync_batchnorm=True).fit(X, y)
        # each rank normalising its own slice is another fit (its ranks' statistics differ
        # after the last step by design: no drift either)
        alone = _net(strategy="ddp").fit(X, y)
    np.testing.assert_allclose(params_vector(net.module_), params_vector(reference),
                               atol=1e-5, rtol=0)
    ours, theirs = buffers_to_numpy(net.module_), buffers_to_numpy(reference)
    for key in ("net.1.running_mean", "net.1.running_var", "net.1.num_batches_tracked"):
        np.testing.assert_allclose(ours[key], theirs[key], rtol=1e-4, atol=1e-5, err_msg=key)
    assert not np.allclose(params_vector(alone.module_), params_vector(reference), atol=1e-3)


def test_sync_batchnorm_refuses_ranks_with_uneven_steps(client, sorted_data):
    X, y = sorted_data
    net = _net(strategy="ddp", strategy__sync_batchnorm=True, batch_size=2)
    with pytest.raises(ValueError, match="needs every rank to take every step"):
        net.fit(X[:239], y[:239])  # shards of 120 and 119 rows, one per step
