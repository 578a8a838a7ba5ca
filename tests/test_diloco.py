"""``diloco``: inner steps on each replica, an outer Nesterov SGD step on the mean change.

The reference is plain torch in this process: each replica a module of its
own with its own inner optimizer, kept from round to round, and torch's own
``SGD(nesterov=True)`` as the outer optimizer, stepping on the negated mean
change as its gradient.
"""

import copy
import math

import numpy as np
import pytest
import torch

from daskdist import DaskNeuralNetClassifier
from daskdist.state import load_params, params_vector
from daskdist.strategies import DiLoCo, resolve_strategy
from daskdist.testing import TinyNet, reference_steps

LR = 0.1
EPOCHS = 2


def _net(**kwargs):
    # random_state=None: the weights come from torch's RNG, seeded as for the reference
    params = {**dict(max_epochs=EPOCHS, lr=LR, batch_size=32, train_split=None, verbose=0,
                     sharding="sequential", random_state=None, n_replicas=2,
                     strategy="diloco", sync_every=4), **kwargs}
    torch.manual_seed(0)
    return DaskNeuralNetClassifier(TinyNet, **params)


def _diloco(X, y, *, sync_every, inner_momentum, outer_lr, outer_momentum, nesterov,
            fp16=False, replicas=2, batch_size=32):
    """DiLoCo in one process over the same shards and batches as the replicas."""
    torch.manual_seed(0)
    model = TinyNet()
    outer = torch.optim.SGD(model.parameters(), lr=outer_lr, momentum=outer_momentum,
                            nesterov=nesterov)
    copies = [copy.deepcopy(model) for _ in range(replicas)]
    inner = [torch.optim.SGD(c.parameters(), lr=LR, momentum=inner_momentum) for c in copies]
    shards = np.array_split(np.arange(len(X)), replicas)
    per = batch_size // replicas
    steps = max(math.ceil(len(s) / per) for s in shards)
    for _ in range(EPOCHS):
        for first in range(0, steps, sync_every):
            start = params_vector(model)
            changes, weights = [], []
            for replica, opt, shard in zip(copies, inner, shards):
                load_params(replica, start)  # in place: the inner optimizer keeps its state
                seen = reference_steps(replica, opt, X, y, [
                    shard[k * per:(k + 1) * per]
                    for k in range(first, min(first + sync_every, steps))])
                change = params_vector(replica) - start
                changes.append(change.astype(np.float16).astype(np.float32) if fp16 else change)
                weights.append(seen)
            mean = sum(np.float32(w / sum(weights)) * c for w, c in zip(weights, changes))
            offset = 0
            for p in model.parameters():  # the pseudo-gradient, as the outer step's gradient
                n = p.numel()
                p.grad = torch.from_numpy(-mean[offset:offset + n].reshape(p.shape).copy())
                offset += n
            outer.step()
    return params_vector(model)


def test_without_outer_momentum_and_at_outer_lr_1_it_is_local_sgd(client, tiny_data):
    X, y = tiny_data
    diloco = _net(strategy__outer_lr=1.0, strategy__outer_momentum=0.0,
                  strategy__nesterov=False).fit(X, y)
    local = _net(strategy="local_sgd").fit(X, y)
    np.testing.assert_allclose(params_vector(diloco.module_), params_vector(local.module_),
                               atol=1e-6, rtol=0)
    assert diloco.history[-1, "train_loss"] == pytest.approx(local.history[-1, "train_loss"],
                                                             rel=1e-5)


@pytest.mark.parametrize("compression", [None, "fp16"])
def test_diloco_equals_a_single_process_reference(client, tiny_data, compression):
    X, y = tiny_data
    net = _net(optimizer__momentum=0.9, strategy__outer_lr=0.7,
               strategy__outer_momentum=0.9, strategy__compression=compression).fit(X, y)
    expected = _diloco(X, y, sync_every=4, inner_momentum=0.9, outer_lr=0.7,
                       outer_momentum=0.9, nesterov=True, fp16=compression == "fp16")
    np.testing.assert_allclose(params_vector(net.module_), expected, atol=2e-5, rtol=0)
    # not local_sgd: the outer step and each replica's own momentum change the result
    plain = _diloco(X, y, sync_every=4, inner_momentum=0.9, outer_lr=1.0, outer_momentum=0.0,
                    nesterov=False)
    assert np.abs(params_vector(net.module_) - plain).max() > 1e-3
    # the outer momentum is training state, on the client too
    assert net._training_state_.outer["momentum"].shape == expected.shape


def test_diloco_options_are_checked(tiny_data):
    assert resolve_strategy("diloco", {"outer_lr": 0.5}).outer_lr == 0.5
    for options, message in [({"outer_lr": 0}, "outer_lr must be positive"),
                             ({"outer_momentum": 1.0}, r"outer_momentum must be in \[0, 1\)"),
                             ({"outer_momentum": 0.0}, "nesterov=True needs"),
                             ({"nesterov": "yes"}, "nesterov must be"),
                             ({"outer_lr": "fast"}, "outer_lr must be a number"),
                             ({"compression": "zip"}, "compression")]:
        with pytest.raises(ValueError, match=message):
            resolve_strategy("diloco", options)
    with pytest.raises(ValueError, match="deadline"):
        DiLoCo().set_params(deadline=2.0)
