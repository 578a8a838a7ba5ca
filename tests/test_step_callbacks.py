"""Per-step work on the workers: schedules, clipping and accumulation equal a single process.

Each reference below is plain torch in this process, stepping through the same
batches as the replicas. A schedule applied once per round instead of once per
step, or clipping done anywhere but on the gradient each step applies, makes
these tests fail.
"""

import copy
import inspect
import math
import pathlib
import signal

import numpy as np
import pytest
import skorch.callbacks
import torch
from skorch import NeuralNet, NeuralNetClassifier
from skorch.callbacks import (
    Freezer,
    GradientNormClipping,
    Initializer,
    InputShapeSetter,
    LRScheduler,
    ProgressBar,
    SacredLogger,
)
from torch.optim.lr_scheduler import LambdaLR, OneCycleLR, ReduceLROnPlateau

from daskdist import DaskNeuralNetClassifier, GradientValueClipping
from daskdist.checkpoint import load_checkpoint
from daskdist.state import load_params, params_vector
from daskdist.testing import CtrlCAfterRound, TinyNet, TinySequential, nll_loss

LR = 0.1
EPOCHS = 2


def _alternating(step):
    """Learning-rate factor 0 on even steps and 1 on odd ones."""
    return step % 2


def _per_step(policy, **kwargs):
    return ("schedule", LRScheduler(policy, step_every="batch", **kwargs))


def _net(**kwargs):
    # random_state=None: the weights come from torch's RNG, seeded as for the reference
    params = {**dict(max_epochs=EPOCHS, lr=LR, batch_size=32, train_split=None, verbose=0,
                     sharding="sequential", random_state=None, n_replicas=2), **kwargs}
    torch.manual_seed(0)
    return DaskNeuralNetClassifier(TinyNet, **params)


def _clip(module, clip_norm, clip_value):
    if clip_norm is not None:
        torch.nn.utils.clip_grad_norm_(module.parameters(), clip_norm)
    if clip_value is not None:
        torch.nn.utils.clip_grad_value_(module.parameters(), clip_value)


def _combined_batch(X, y, *, batch_size=32, momentum=0.0, schedule=None, clip_norm=None,
                    clip_value=None, replicas=2):
    """Single-process SGD whose step ``t`` trains on every replica's ``t``-th batch at once."""
    torch.manual_seed(0)
    module = TinyNet()
    opt = torch.optim.SGD(module.parameters(), lr=LR, momentum=momentum)
    scheduler = schedule(opt) if schedule else None
    shards = np.array_split(np.arange(len(X)), replicas)
    per = batch_size // replicas
    steps = max(math.ceil(len(s) / per) for s in shards)
    for _ in range(EPOCHS):
        for t in range(steps):
            rows = np.concatenate([s[t * per:(t + 1) * per] for s in shards])
            opt.zero_grad()
            nll_loss(module, X[rows], y[rows]).backward()
            _clip(module, clip_norm, clip_value)
            opt.step()
            if scheduler:
                scheduler.step()
    return params_vector(module)


def _local_sgd(X, y, *, batch_size, sync_every, factor=lambda step: 1.0, clip_norm=None,
               replicas=2):
    """Replicas stepping through their own shards with the schedule, averaged every round."""
    torch.manual_seed(0)
    model = TinyNet()
    shards = np.array_split(np.arange(len(X)), replicas)
    per = batch_size // replicas
    steps = max(math.ceil(len(s) / per) for s in shards)
    for epoch in range(EPOCHS):
        for first in range(0, steps, sync_every):
            ends, weights = [], []
            for shard in shards:
                replica = copy.deepcopy(model)
                opt = torch.optim.SGD(replica.parameters(), lr=LR)
                seen = 0
                for k in range(first, min(first + sync_every, steps)):
                    rows = shard[k * per:(k + 1) * per]
                    opt.param_groups[0]["lr"] = LR * factor(epoch * steps + k)
                    opt.zero_grad()
                    nll_loss(replica, X[rows], y[rows]).backward()
                    _clip(replica, clip_norm, None)
                    opt.step()
                    seen += len(rows)
                ends.append(params_vector(replica))
                weights.append(seen)
            load_params(model, np.average(ends, axis=0, weights=weights).astype(np.float32))
    return params_vector(model)


def _close(net, expected, atol=1e-5):
    np.testing.assert_allclose(params_vector(net.module_), expected, atol=atol, rtol=0)


def _one_cycle(total_steps):
    return lambda opt: OneCycleLR(opt, max_lr=0.5, total_steps=total_steps)


@pytest.mark.parametrize("strategy", ["sync", "ddp"])
def test_a_per_step_schedule_equals_single_process_on_the_combined_batch(client, tiny_data,
                                                                          strategy):
    X, y = tiny_data
    expected = _combined_batch(X, y, momentum=0.9, schedule=lambda o: LambdaLR(o, _alternating))
    net = _net(strategy=strategy, optimizer__momentum=0.9,
               callbacks=[_per_step(LambdaLR, lr_lambda=_alternating)]).fit(X, y)
    _close(net, expected)
    # the schedule really alternates within rounds: once per round would be another fit
    per_round = _combined_batch(X, y, momentum=0.9)
    assert not np.allclose(expected, per_round, atol=1e-3)
    assert net.steps_per_epoch_ == math.ceil(len(X) / 32)
    assert net.history[:, "schedule_steps"] == [net.steps_per_epoch_] * EPOCHS
    assert net.history[1, "event_lr"] == [LR * _alternating(8 + k) for k in range(8)]


def test_one_cycle_cycles_lr_and_momentum_on_the_workers(client, tiny_data):
    X, y = tiny_data
    steps = EPOCHS * math.ceil(len(X) / 32)
    expected = _combined_batch(X, y, momentum=0.9, schedule=_one_cycle(steps))
    net = _net(optimizer__momentum=0.9,
               callbacks=[_per_step(OneCycleLR, max_lr=0.5, total_steps=steps)]).fit(X, y)
    _close(net, expected)
    # OneCycleLR also cycles SGD's momentum: leaving it out changes the fit
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=LR, momentum=0.9)
    reference = OneCycleLR(opt, max_lr=0.5, total_steps=steps)
    lrs = []
    for _ in range(steps):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        reference.step()
    np.testing.assert_allclose(sum(net.history[:, "event_lr"], []), lrs, rtol=1e-12)
    assert net.optimizer_.param_groups[0]["lr"] == pytest.approx(opt.param_groups[0]["lr"])


def test_local_sgd_steps_every_replica_through_the_schedule(client, tiny_data):
    X, y = tiny_data
    # 15 local steps an epoch: rounds of 10 and 5, and the second epoch starts at an odd step
    expected = _local_sgd(X, y, batch_size=16, sync_every=10, factor=_alternating)
    net = _net(strategy="local_sgd", sync_every=10, batch_size=16,
               callbacks=[_per_step(LambdaLR, lr_lambda=_alternating)]).fit(X, y)
    assert net.steps_per_epoch_ == 15
    _close(net, expected)
    assert not np.allclose(expected, _local_sgd(X, y, batch_size=16, sync_every=10), atol=1e-3)


def test_sync_clips_the_averaged_gradient_as_one_process_does(client, tiny_data):
    X, y = tiny_data
    unclipped = _combined_batch(X, y)
    by_norm = _combined_batch(X, y, clip_norm=0.05)
    assert not np.allclose(by_norm, unclipped, atol=1e-3)  # the clip bites
    _close(_net(callbacks=[("clip", GradientNormClipping(0.05))]).fit(X, y), by_norm)
    _close(_net(gradient_clip=0.05).fit(X, y), by_norm)
    by_value = _combined_batch(X, y, clip_value=0.01)
    assert not np.allclose(by_value, unclipped, atol=1e-3)
    _close(_net(callbacks=[("clip", GradientValueClipping(0.01))]).fit(X, y), by_value)


def test_local_sgd_clips_each_replicas_own_gradient(client, tiny_data):
    X, y = tiny_data
    expected = _local_sgd(X, y, batch_size=32, sync_every=3, clip_norm=0.05)
    assert not np.allclose(expected, _local_sgd(X, y, batch_size=32, sync_every=3), atol=1e-3)
    _close(_net(strategy="local_sgd", sync_every=3, gradient_clip=0.05).fit(X, y), expected)


@pytest.mark.parametrize("strategy", ["sync", "local_sgd"])
def test_four_accumulated_micro_batches_are_one_batch_four_times_larger(client, tiny_data,
                                                                        strategy):
    X, y = tiny_data
    whole = _net(strategy=strategy, sync_every=3, batch_size=32).fit(X, y)
    parts = _net(strategy=strategy, sync_every=3, batch_size=8, accumulate_steps=4).fit(X, y)
    assert parts.steps_per_epoch_ == whole.steps_per_epoch_ == 8
    _close(parts, params_vector(whole.module_))
    np.testing.assert_allclose(parts.history[:, "train_loss"], whole.history[:, "train_loss"],
                               rtol=1e-5)


@pytest.mark.timeout(180)
def test_ctrl_c_mid_epoch_with_one_cycle_resumes_exactly(client, tiny_data, tmp_path):
    X, y = tiny_data
    epochs = 4
    total = epochs * math.ceil(len(X) / 32)

    def net(**kwargs):
        return _net(max_epochs=epochs, random_state=0, optimizer__momentum=0.9, **kwargs)

    whole = net(callbacks=[_per_step(OneCycleLR, max_lr=0.5, total_steps=total)]).fit(X, y)

    ck = tmp_path / "ck"
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        interrupted = net(callbacks=[
            _per_step(OneCycleLR, max_lr=0.5, total_steps=total),
            ("checkpoint", CtrlCAfterRound(ck, every=10, every_rounds=2, epoch=1))]).fit(X, y)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert "train_loss" not in interrupted.history[-1]
    state, _ = load_checkpoint(ck)
    assert state.epoch == 1 and state.log  # saved in the middle of the second epoch
    resumed = net(callbacks=[_per_step(OneCycleLR, max_lr=0.5, total_steps=total)]).fit(
        X, y, resume=ck)
    np.testing.assert_allclose(params_vector(resumed.module_), params_vector(whole.module_),
                               atol=1e-6, rtol=0)
    assert resumed.history[-1, "event_lr"] == whole.history[-1, "event_lr"]


def test_a_schedule_shorter_than_the_fit_is_refused_naming_the_steps(client, tiny_data):
    X, y = tiny_data
    net = _net(callbacks=[_per_step(OneCycleLR, max_lr=0.5, total_steps=10)])
    with pytest.raises(ValueError, match=r"refused step 11 .*net.steps_per_epoch_"):
        net.fit(X, y)


_REFUSED = [
    (dict(callbacks=[_per_step(ReduceLROnPlateau)]), "ReduceLROnPlateau per batch"),
    (dict(strategy="async", callbacks=[_per_step(LambdaLR, lr_lambda=_alternating)]),
     "no common step"),
    (dict(module=TinySequential, strategy="pipeline", gradient_clip=1.0), "spans the stages"),
    (dict(strategy="ddp", accumulate_steps=2), "all-reduces in every backward pass"),
    (dict(accumulate_steps=0), r"accumulate_steps=0 \(an integer >= 1\)"),
    (dict(gradient_clip=-1.0), "a positive norm"),
    (dict(gradient_clip=1.0, callbacks=[("clip", GradientNormClipping(1.0))]),
     "more than once"),
    (dict(callbacks=[("progress", ProgressBar())]), r"acts per batch .* where no batch runs"),
    (dict(callbacks=[("freeze", Freezer("net.0.*"))]), "replicas are built once per fit"),
    (dict(callbacks=[("sacred", SacredLogger(None, log_on_batch_end=True))]),
     "log_on_batch_end=True logs per batch"),
]


@pytest.mark.parametrize("params, message", _REFUSED, ids=[m for _, m in _REFUSED])
def test_what_cannot_act_on_the_workers_is_refused_with_its_reason(tiny_data, params, message):
    X, y = tiny_data
    params = dict(params)
    module = params.pop("module", TinyNet)
    net = DaskNeuralNetClassifier(module, max_epochs=1, train_split=None, verbose=0,
                                  scheduler_address="tcp://127.0.0.1:1", **params)
    with pytest.raises(ValueError, match=message):  # before it connects to any cluster
        net.fit(X, y)


def test_an_initializer_at_the_first_epoch_reaches_the_workers(client, tiny_data):
    X, y = tiny_data

    def constant(tensor):
        return torch.nn.init.constant_(tensor, 0.25)

    net = _net(lr=0.0, callbacks=[("init", Initializer("*", fn=constant))]).fit(X, y)
    # lr=0: the workers trained the initialised parameters and left them as they were
    np.testing.assert_array_equal(params_vector(net.module_), 0.25)


def test_an_input_shape_setter_sizes_the_module_before_the_fit_starts(client, tiny_data):
    X, y = tiny_data
    net = _net(callbacks=[("shape", InputShapeSetter(param_name="n_features"))])
    net.fit(X[:, :12], y)  # TinyNet expects 20 features unless told otherwise
    assert net.module_.net[0].in_features == 12


def test_the_skorch_page_names_every_skorch_parameter_and_callback():
    page = (pathlib.Path(__file__).parents[1] / "docs" / "skorch.md").read_text()
    parameters = {*inspect.signature(NeuralNet.__init__).parameters,
                  *inspect.signature(NeuralNetClassifier.__init__).parameters}
    names = (parameters - {"self", "args", "kwargs"}) | (set(skorch.callbacks.__all__)
                                                         - {"Callback"})
    assert sorted(n for n in names if f"`{n}" not in page) == []
