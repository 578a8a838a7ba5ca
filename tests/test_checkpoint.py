"""Checkpoints: safetensors + JSON, atomic writes, exact resume, no unpickling."""

import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch

from daskdist import DaskNeuralNetClassifier
from daskdist.callbacks import Checkpoint
from daskdist.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from daskdist.models import MLP
from daskdist.state import TrainingState, module_to_state, params_vector
from daskdist.testing import CtrlCAfterRound, TinyNet, TinySequential


def _assert_same_tree(a, b):
    assert type(a) is type(b)
    if isinstance(a, dict):
        assert list(a) == list(b)  # keys keep their types (optimizer state uses ints)
        for key in a:
            _assert_same_tree(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _assert_same_tree(x, y)
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and a.shape == b.shape  # 0-d step counters stay 0-d
        np.testing.assert_array_equal(a, b)
    else:
        assert a == b


def test_a_checkpoint_restores_parameters_buffers_optimizer_and_counters(tmp_path):
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    opt = torch.optim.Adam(module.parameters(), lr=0.1, betas=(0.8, 0.99))
    module(torch.randn(8, 4)).sum().backward()
    opt.step()
    saved = module_to_state(module, opt, step=5, round=7, epoch=2)
    save_checkpoint(tmp_path / "ck", saved, {"note": np.float32(0.5)})
    state, meta = load_checkpoint(tmp_path / "ck")
    assert (state.step, state.round, state.epoch, meta) == (5, 7, 2, {"note": 0.5})
    _assert_same_tree((saved.params, saved.buffers, saved.optimizer),
                      (state.params, state.buffers, state.optimizer))
    assert state.optimizer["param_groups"][0]["betas"] == (0.8, 0.99)


_WRITER = textwrap.dedent("""
    import sys, numpy as np
    from daskdist.checkpoint import save_checkpoint
    from daskdist.state import TrainingState
    i = 0
    while True:
        i += 1
        save_checkpoint(sys.argv[1], TrainingState(np.full(200_000, i, np.float32), round=i))
        print(i, flush=True)
""")


@pytest.mark.timeout(120)
def test_a_writer_killed_mid_write_leaves_a_complete_checkpoint(tmp_path):
    path = tmp_path / "ck"
    rng = np.random.default_rng(0)
    for _ in range(6):
        proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(path)],
                                stdout=subprocess.PIPE, text=True)
        proc.stdout.readline()  # at least one checkpoint is complete
        time.sleep(rng.uniform(0.0, 0.3))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        state, _ = load_checkpoint(path)
        # the tensors are the ones the sidecar describes, never half of a write
        assert state.round >= 1
        np.testing.assert_array_equal(state.params, np.full(200_000, state.round, np.float32))
    assert len(list(path.glob("state-*.safetensors"))) <= 2  # old tensor files are cleaned up


def _net(module=TinyNet, **kwargs):
    params = dict(lr=0.1, batch_size=32, verbose=0, random_state=0, train_split=None,
                  optimizer__momentum=0.9, iterator_train__shuffle=True)
    if kwargs.get("strategy") == "ssp":  # in lock-step, so that runs can be compared
        params["strategy__staleness"] = 0
    return DaskNeuralNetClassifier(module, **{**params, **kwargs})


@pytest.fixture(scope="module")
def uninterrupted():
    """``uninterrupted(strategy, X, y)``: the 4-epoch reference fit, made once per strategy."""
    fits = {}

    def fit(strategy, X, y):
        if strategy not in fits:
            fits[strategy] = _net(max_epochs=4, strategy=strategy, sync_every=3).fit(X, y)
        return fits[strategy]

    return fit


def _assert_same_end(resumed, whole):
    """The resumed fit ends at the uninterrupted fit's parameters and losses."""
    np.testing.assert_allclose(params_vector(resumed.module_), params_vector(whole.module_),
                               atol=1e-6, rtol=0)
    assert len(resumed.history) == len(whole.history)
    np.testing.assert_allclose(resumed.history[:, "train_loss"], whole.history[:, "train_loss"],
                               rtol=1e-5)


@pytest.mark.parametrize("strategy", ["sync", "local_sgd"])
def test_a_resumed_fit_ends_where_an_uninterrupted_one_does(client, tiny_data, tmp_path,
                                                            strategy, uninterrupted):
    X, y = tiny_data
    whole = uninterrupted(strategy, X, y)

    ck = tmp_path / "ck"
    first = _net(max_epochs=2, strategy=strategy, sync_every=3,
                 callbacks=[("checkpoint", Checkpoint(ck))]).fit(X, y)
    assert load_checkpoint(ck)[0].epoch == 2
    resumed = _net(max_epochs=4, strategy=strategy, sync_every=3).fit(X, y, resume=ck)

    assert not np.allclose(params_vector(resumed.module_), params_vector(first.module_))
    _assert_same_end(resumed, whole)
    assert resumed.rounds_["round"].tolist() == whole.rounds_["round"].tolist()[-len(
        resumed.rounds_):]



# What replicas keep of their own (daskdist.worker.own_state): topk residuals (per replica, or
# per group under hierarchical), the replicas' own optimizer state under compressed local_sgd
# and hierarchical and under diloco (momentum here), fp16 loss scalers; and diloco's outer
# momentum, shared.
_EXACT = [("sync", "fp16", None), ("sync", "bf16", None), ("sync", "topk", None),
          ("sync", None, "fp16"), ("local_sgd", "fp16", None), ("local_sgd", "bf16", None),
          ("local_sgd", "topk", None), ("local_sgd", None, "fp16"),
          ("hierarchical", None, None), ("hierarchical", "fp16", None),
          ("hierarchical", "bf16", None), ("hierarchical", "topk", None),
          ("ddp", None, None), ("pipeline", None, None),
          ("diloco", None, None), ("diloco", "topk", None),
          ("local_sgd-overlap", None, None), ("local_sgd-overlap", "topk", None),
          ("diloco-overlap", None, None), ("diloco-stream", "topk", None),
          ("hierarchical-overlap", "topk", None), ("diloco-groups", "topk", None)]


def _exact_net(strategy, compression, precision, **kwargs):
    name, _, variant = strategy.partition("-")
    params = dict(strategy=name, sync_every=3, **kwargs)
    if variant:  # overlapped rounds; "stream": streaming diloco, three fragments
        params["strategy__overlap"] = True
    if variant == "stream":
        params["strategy__fragments"] = 3
    if variant == "groups":  # the changes summed per host, folded two rounds late
        params["strategy__groups"] = "host"
    if compression:
        params.update(strategy__compression=compression, strategy__density=0.1)
    if precision:
        params["precision"] = precision
    if name == "hierarchical":  # two groups of two replicas
        params.update(n_replicas=4, strategy__groups=[[0, 1], [2, 3]])
    if strategy == "pipeline":
        return _net(module=TinySequential, strategy__n_stages=2, **params)
    return _net(**params)


@pytest.mark.parametrize("strategy, compression, precision", _EXACT,
                         ids=["-".join(filter(None, c)) for c in _EXACT])
def test_a_resumed_fit_is_exact_whatever_replicas_keep_of_their_own(
        client, tiny_data, tmp_path, strategy, compression, precision):
    X, y = tiny_data
    whole = _exact_net(strategy, compression, precision, max_epochs=4).fit(X, y)
    ck = tmp_path / "ck"
    _exact_net(strategy, compression, precision, max_epochs=2,
               callbacks=[("checkpoint", Checkpoint(ck))]).fit(X, y)
    saved, _ = load_checkpoint(ck)
    n_replicas = 4 if strategy == "hierarchical" else 2
    own_momentum = (strategy.startswith("diloco") or "-" in strategy
                    or (compression and strategy != "sync"))
    if compression == "topk" or own_momentum:
        # every replica's own part is in the checkpoint: a residual, or its own momentum
        assert {f"replica {i}" for i in range(n_replicas)} <= set(saved.own)
    if compression == "topk" and strategy == "hierarchical":
        assert {"group 0", "group 1"} <= set(saved.own)
        assert all(saved.own[f"group {g}"]["residual"].any() for g in (0, 1))
    if strategy.startswith("diloco"):  # the outer momentum, shared
        assert saved.outer["momentum"].shape == saved.params.shape
    if own_momentum:  # replicas' momenta differ: each keeps its own
        momenta = [saved.own[f"replica {i}"]["optimizer"]["state"][0]["momentum_buffer"]
                   for i in range(n_replicas)]
        assert not np.array_equal(momenta[0], momenta[1])
    resumed = _exact_net(strategy, compression, precision, max_epochs=4).fit(X, y, resume=ck)
    np.testing.assert_allclose(params_vector(resumed.module_), params_vector(whole.module_),
                               atol=1e-6, rtol=0)
    np.testing.assert_allclose(resumed.history[:, "train_loss"], whole.history[:, "train_loss"],
                               rtol=1e-6)


_DYING_CLIENT = textwrap.dedent("""
    import os, signal, sys
    from daskdist import DaskNeuralNetClassifier
    from daskdist.callbacks import Checkpoint
    from daskdist.testing import TinyNet, make_classification

    class CheckpointThenDie(Checkpoint):
        def save_round(self, net, state):
            super().save_round(net, state)
            if any(r["epoch"] == 1 for r in state.log):  # saved in the middle of epoch 1
                os.kill(os.getpid(), signal.SIGKILL)  # the client process dies

    address, path, strategy = sys.argv[1:]
    X, y = make_classification()
    DaskNeuralNetClassifier(
        TinyNet, lr=0.1, batch_size=32, verbose=0, random_state=0, train_split=None,
        optimizer__momentum=0.9, iterator_train__shuffle=True, max_epochs=4,
        strategy=strategy, sync_every=3, scheduler_address=address,
        callbacks=[("checkpoint", CheckpointThenDie(path, every_rounds=2))],
        **({"strategy__staleness": 0} if strategy == "ssp" else {}),
    ).fit(X, y)
""")


@pytest.mark.timeout(180)
@pytest.mark.parametrize("strategy", ["sync", "local_sgd", "ssp"])
def test_a_client_killed_mid_epoch_resumes_at_the_exact_round(client, tiny_data, tmp_path,
                                                             strategy, uninterrupted):
    X, y = tiny_data
    whole = uninterrupted(strategy, X, y)

    ck = tmp_path / "ck"
    proc = subprocess.run([sys.executable, "-c", _DYING_CLIENT, client.scheduler.address,
                           str(ck), strategy], timeout=120)
    assert proc.returncode == -signal.SIGKILL
    state, meta = load_checkpoint(ck)
    done_in_epoch = sum(1 for r in state.log if r["epoch"] == 1)
    assert state.epoch == 1 and done_in_epoch >= 1 and state.round % 2 == 0
    assert len(meta["history"]) == 2  # one finished epoch, one in progress

    resumed = _net(max_epochs=4, strategy=strategy, sync_every=3).fit(X, y, resume=ck)
    _assert_same_end(resumed, whole)
    # the resumed epoch's rounds: those before the kill (from the checkpoint) and the rest
    rounds_per_epoch = len(whole.rounds_) // 4
    assert resumed.rounds_["round"].tolist() == list(range(rounds_per_epoch, 4 * rounds_per_epoch))


@pytest.mark.timeout(180)
@pytest.mark.parametrize("strategy", ["sync", "local_sgd"])
def test_ctrl_c_mid_epoch_saves_the_last_round_and_resumes_exactly(client, tiny_data, tmp_path,
                                                                   strategy, uninterrupted):
    X, y = tiny_data
    whole = uninterrupted(strategy, X, y)

    ck = tmp_path / "ck"
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        interrupted = _net(max_epochs=4, strategy=strategy, sync_every=3, callbacks=[
            ("checkpoint", CtrlCAfterRound(ck, every=10, every_rounds=2, epoch=1))]).fit(X, y)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert len(interrupted.history) == 2 and "train_loss" not in interrupted.history[-1]
    state, _ = load_checkpoint(ck)
    # saved at train end: the net's state after Ctrl-C (the newest finished round), not the
    # round that raised it
    assert state.round == interrupted._training_state_.round
    resumed = _net(max_epochs=4, strategy=strategy, sync_every=3).fit(X, y, resume=ck)
    if state.epoch == 1:
        _assert_same_end(resumed, whole)
    else:
        # every round of the epoch had finished before Ctrl-C reached the driver (its three
        # rounds can run ahead of the round hooks): the state is the epoch's end, while the
        # history still has the epoch as interrupted, and the resumed fit has no row for it
        assert state.epoch == 2
        np.testing.assert_allclose(params_vector(resumed.module_), params_vector(whole.module_),
                                   atol=1e-6, rtol=0)


def test_round_checkpoints_are_validated():
    with pytest.raises(ValueError, match="every_rounds must be a positive integer"):
        Checkpoint("ck", every_rounds=0).initialize()


def test_the_sidecar_names_what_it_could_not_store(client, tiny_data, tmp_path):
    X, y = tiny_data
    net = _net(max_epochs=1, criterion=torch.nn.NLLLoss,
               callbacks=[("checkpoint", Checkpoint(tmp_path / "ck"))]).fit(X, y)
    _, meta = load_checkpoint(tmp_path / "ck")
    assert meta["params"]["module"] == {"import": "daskdist.testing.TinyNet"}
    assert meta["params"]["criterion"] == {"import": "torch.nn.modules.loss.NLLLoss"}
    assert "callbacks" in meta["not_stored"]
    assert meta["classes"] == net.classes_.tolist()
    assert len(meta["history"]) == 1


def test_a_checkpoint_of_another_model_is_refused(client, tiny_data, tmp_path):
    X, y = tiny_data
    _net(max_epochs=1, callbacks=[("checkpoint", Checkpoint(tmp_path / "ck"))]).fit(X, y)
    other = DaskNeuralNetClassifier(MLP, module__hidden=(7,), max_epochs=2, verbose=0,
                                    train_split=None)
    with pytest.raises(CheckpointError, match="parameters"):
        other.fit(X, y, resume=tmp_path / "ck")


class _Evil:
    def __init__(self, sentinel):
        self.sentinel = sentinel

    def __reduce__(self):
        return (open, (self.sentinel, "w"))


def test_pickle_files_are_refused_unread(tiny_data, tmp_path):
    X, y = tiny_data
    sentinel = tmp_path / "pwned"
    evil = pickle.dumps(_Evil(str(sentinel)))
    (tmp_path / "evil.pkl").write_bytes(evil)
    torch.save({"w": torch.zeros(2)}, tmp_path / "params.pt")  # skorch's format: pickle in zip
    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / "checkpoint.json").write_bytes(evil)

    for path in (tmp_path / "evil.pkl", tmp_path / "params.pt", fake / "checkpoint.json", fake):
        with pytest.raises(CheckpointError, match="never unpickles"):
            load_checkpoint(path)
    net = _net(max_epochs=1)
    with pytest.raises(CheckpointError, match="never unpickles"):
        net.fit(X, y, resume=tmp_path / "evil.pkl")  # refused before anything is submitted
    assert not sentinel.exists()

    # a tensor file swapped for a pickle is refused too
    good = tmp_path / "good"
    save_checkpoint(good, TrainingState(np.zeros(3, np.float32)))
    next(good.glob("state-*.safetensors")).write_bytes(evil)
    with pytest.raises(CheckpointError, match="never unpickles"):
        load_checkpoint(good)
    assert not sentinel.exists()
    assert not os.path.exists(sentinel)


def test_a_version_1_checkpoint_on_disk_still_loads():
    """tests/data/checkpoint-v1 was written by the first format; it must load, value for value.

    The fixture holds a Linear(3, 2) + BatchNorm1d(2) after one SGD step with momentum from known
    parameters; the test redoes that step and compares.
    """
    from pathlib import Path

    from daskdist.checkpoint import READABLE_VERSIONS

    assert 1 in READABLE_VERSIONS
    state, meta = load_checkpoint(Path(__file__).parent / "data" / "checkpoint-v1")
    assert meta == {"note": "format version 1"}
    assert (state.step, state.round, state.epoch, state.skipped) == (7, 7, 1, 0)

    module = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    with torch.no_grad():
        for i, p in enumerate(module.parameters()):
            p.copy_(torch.arange(p.numel(), dtype=torch.float32).reshape(p.shape) / 8 + i)
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1, momentum=0.9)
    module(torch.arange(12, dtype=torch.float32).reshape(4, 3)).pow(2).sum().backward()
    optimizer.step()
    expected = module_to_state(module, optimizer)

    np.testing.assert_array_equal(state.params, expected.params)
    assert set(state.buffers) == set(expected.buffers)
    for name, value in expected.buffers.items():
        np.testing.assert_array_equal(np.asarray(state.buffers[name]), np.asarray(value))
    momenta = [s["momentum_buffer"] for s in state.optimizer["state"].values()]
    for got, want in zip(momenta, [s["momentum_buffer"] for s in
                                   expected.optimizer["state"].values()], strict=True):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert state.optimizer["param_groups"][0]["momentum"] == 0.9
