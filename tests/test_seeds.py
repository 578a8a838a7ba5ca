"""torch's one generator per process, shared by fits started in several threads of a client.

A seeded build draws its initial weights from a stream that nothing else in
the process may touch meanwhile: not an unseeded build drawing from the
generator, not a dry forward pass that restores the generator afterwards
(which replays the draws made while it ran).
"""

from __future__ import annotations

import threading
import time

import numpy as np
import torch

from daskdist import MLP, DaskNeuralNetRegressor
from daskdist.dry_pass import check_output_width
from daskdist.seeds import seeded_torch

_WAIT = 0.5


class _Pausing(torch.nn.Module):
    """A linear module whose forward pass stops until it is told to go on."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 1)
        self.inside = threading.Event()
        self.go_on = threading.Event()

    def forward(self, X):
        self.inside.set()
        self.go_on.wait(_WAIT)
        return self.lin(X)


def _stream(seed, n):
    with seeded_torch(seed):
        return torch.rand(n)


def test_a_dry_forward_pass_never_replays_a_seeded_builds_draws():
    expected = _stream(7, 3)
    net = DaskNeuralNetRegressor(_Pausing, train_split=None, verbose=0).initialize()
    net._n_outputs_ = 1
    module = net.module_
    dry_pass = threading.Thread(target=check_output_width, args=(net, np.zeros((2, 4))))
    with seeded_torch(7):
        draws = [torch.rand(1)]
        dry_pass.start()
        # a dry pass that could start now would save the generator here and restore it later
        module.inside.wait(_WAIT)
        draws.append(torch.rand(1))
        module.go_on.set()
        if module.inside.is_set():
            dry_pass.join()
        draws.append(torch.rand(1))
    dry_pass.join()
    torch.testing.assert_close(torch.cat(draws), expected, rtol=0, atol=0)


def test_an_unseeded_build_never_draws_from_a_seeded_builds_stream():
    expected = _stream(7, 2)
    net = DaskNeuralNetRegressor(MLP, module__hidden=(64,), random_state=None,
                                 train_split=None, verbose=0)
    build = threading.Thread(target=net.initialize)
    with seeded_torch(7):
        draws = [torch.rand(1)]
        build.start()
        time.sleep(_WAIT)  # time enough to build the module, were it not kept waiting
        draws.append(torch.rand(1))
    build.join()
    torch.testing.assert_close(torch.cat(draws), expected, rtol=0, atol=0)
    assert net.module_ is not None
