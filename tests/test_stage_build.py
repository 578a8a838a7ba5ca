"""``strategy__build="workers"``: stages built where they live, the state kept in them."""

import numpy as np
import pytest
import torch
from torch import nn

from daskdist import DaskNeuralNetClassifier, DaskNeuralNetRegressor
from daskdist.errors import StagesLost
from daskdist.state import params_vector
from daskdist.testing import (
    TinyBlockStack,
    TinySequential,
    make_classification,
    reference_steps,
)
from daskdist.worker.stage_build import check_buildable, initialise, on_meta
from daskdist.worker.stages import materialise


def _net(client, module=TinySequential, **kwargs):
    params = dict(max_epochs=2, lr=0.05, batch_size=64, optimizer__momentum=0.9,
                  strategy="pipeline", strategy__build="workers", train_split=None,
                  verbose=0, random_state=0, scheduler_address=client.scheduler.address)
    return DaskNeuralNetClassifier(module, **{**params, **kwargs})


def _meta(module_cls, **kwargs):
    with torch.device("meta"):
        return module_cls(**kwargs)


# -- building on the workers -------------------------------------------------------------------
def test_units_are_initialised_from_their_path_whatever_the_stages():
    meta = _meta(TinyBlockStack, n_blocks=3)
    whole = materialise(meta, random_state=5)
    assert not on_meta(whole)
    # a stage made of some units gets the same values as those units of the whole model
    import copy

    from daskdist.worker.stages import StageModule

    stage = StageModule([("blocks.1", copy.deepcopy(meta.blocks[1])),
                         ("head", copy.deepcopy(meta.head))])
    initialise(stage, ["blocks.1", "head"], random_state=5)
    made = dict(stage.named_parameters())
    for name, value in whole.named_parameters():
        if name in made:
            torch.testing.assert_close(made[name], value, rtol=0, atol=0)
    assert len(made) == len(list(whole.blocks[1].parameters())) + len(
        list(whole.head.parameters()))
    # units differ from one another, and another random_state gives other values
    assert not torch.equal(whole.blocks[0].mlp[0].weight, whole.blocks[1].mlp[0].weight)
    other = materialise(meta, random_state=6)
    assert not torch.equal(other.embed.weight, whole.embed.weight)
    # the process's generator is left alone
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    materialise(meta, random_state=5)
    assert torch.equal(torch.rand(3), expected)


class _Scaled(nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(4))  # set here only: lost on meta

    def forward(self, x):
        return x * self.scale


def test_only_modules_that_can_reset_their_tensors_are_built_on_workers():
    check_buildable(_meta(TinySequential))
    with torch.device("meta"):
        scaled = nn.Sequential(nn.Linear(4, 4), _Scaled(), nn.Linear(4, 2))
    with pytest.raises(ValueError, match=r"\['1'\] hold parameters or buffers but have no "
                                         r"reset_parameters\(\)"):
        check_buildable(scaled)
    with pytest.raises(ValueError, match="pass the class"):
        check_buildable(TinySequential())


def test_a_built_module_or_one_without_resets_is_refused_before_any_work(client):
    X, y = make_classification(100)
    with pytest.raises(ValueError, match="pass the class"):
        _net(client, module=TinySequential()).fit(X, y)
    net = _net(client)
    with pytest.raises(ValueError, match="a cluster that stays up"):
        net._check_stage_home(client, embedded=True)


# -- training, scoring and predicting through the stages --------------------------------------
def _reference(net, X, y, epochs, batch_size, momentum=0.9):
    """Plain torch SGD from the values the workers gave the stages, on the same batches."""
    module = materialise(net.module_, net.random_state_)
    optimizer = torch.optim.SGD(module.parameters(), lr=net.lr, momentum=momentum)
    batches = [np.arange(i, min(i + batch_size, len(X))) for i in range(0, len(X), batch_size)]
    for _ in range(epochs):
        reference_steps(module, optimizer, X, y, batches)
    return module


@pytest.mark.parametrize("module, n_stages, n_micro, schedule", [
    (TinySequential, 2, 1, "gpipe"),
    (TinySequential, 3, 4, "gpipe"),
    (TinySequential, 3, 6, "1f1b"),
    (TinyBlockStack, 3, 3, "1f1b"),
])
def test_stage_built_fit_equals_plain_sgd_from_the_same_values(client, module, n_stages,
                                                               n_micro, schedule):
    X, y = make_classification(320)
    net = _net(client, module=module, sharding="sequential", strategy__n_stages=n_stages,
               strategy__n_micro_batches=n_micro, strategy__schedule=schedule).fit(X, y)
    # the client never held the model's values
    assert on_meta(net.module_) and net._current_state().params.size == 0
    assert net.stages_.n_stages == n_stages
    assert sum(net.stages_.n_params) == sum(p.numel() for p in net.module_.parameters())
    reference = _reference(net, X, y, epochs=2, batch_size=64)
    with pytest.warns(UserWarning, match="MiB of parameters"):
        gathered = net.gather_module()
    np.testing.assert_allclose(params_vector(gathered), params_vector(reference), atol=1e-5)
    # predictions flow through the stages, and equal the gathered model's
    expected = gathered(torch.from_numpy(X)).detach().numpy()
    np.testing.assert_allclose(net.predict_proba(X), expected, atol=1e-6)
    np.testing.assert_array_equal(net.predict(X), expected.argmax(axis=1))
    losses = [r["loss"] for _, r in net.rounds_.iterrows()]
    assert losses[-1] < losses[0]
    net.release_stages()


def test_two_pipelines_equal_sync_from_the_same_values(client):
    X, y = make_classification(300)
    net = _net(client, batch_size=37, n_replicas=2, strategy__n_micro_batches=3,
               strategy__schedule="1f1b").fit(X, y)
    start = materialise(net.module_, net.random_state_)
    sync = DaskNeuralNetClassifier(
        start, max_epochs=2, lr=0.05, batch_size=37, optimizer__momentum=0.9, strategy="sync",
        n_replicas=2, train_split=None, verbose=0, random_state=0,
        scheduler_address=client.scheduler.address).fit(X, y)
    with pytest.warns(UserWarning):
        gathered = net.gather_module()
    np.testing.assert_allclose(params_vector(gathered), params_vector(sync.module_), atol=1e-5)
    np.testing.assert_allclose(net.history[:, "train_loss"], sync.history[:, "train_loss"],
                               rtol=1e-5)
    net.release_stages()


def test_hold_out_scores_and_dask_predictions_go_through_the_stages(client):
    import dask.array as da

    X, y = make_classification(400)
    from skorch.dataset import ValidSplit

    net = _net(client, train_split=ValidSplit(5), max_epochs=3, lr=0.2).fit(X, y)
    assert np.isfinite(net.history[:, "valid_loss"]).all()
    assert net.history[-1, "valid_acc"] > 0.5
    with pytest.warns(UserWarning):
        gathered = net.gather_module()
    proba = gathered(torch.from_numpy(X)).detach().numpy()
    lazy = net.predict_proba(da.from_array(X, chunks=150))
    assert isinstance(lazy, da.Array)
    np.testing.assert_allclose(lazy.compute(), proba, atol=1e-6)
    labels = net.predict(da.from_array(X, chunks=150)).compute()
    np.testing.assert_array_equal(labels, proba.argmax(axis=1))
    # a row's output does not depend on the rows beside it
    order = np.random.default_rng(0).permutation(len(X))
    np.testing.assert_array_equal(net.predict_proba(X[order]), net.predict_proba(X)[order])
    net.release_stages()
    from sklearn.exceptions import NotFittedError

    with pytest.raises(NotFittedError, match="stages are gone"):
        net.predict(X)
    assert set(client.run(_stages_held).values()) == {0}


def test_a_regressor_predicts_through_its_stages(client):
    rng = np.random.default_rng(0)
    X = rng.normal(size=(200, 20)).astype(np.float32)
    y = X[:, :2].sum(1).astype(np.float32)
    net = DaskNeuralNetRegressor(
        TinySequential, module__n_outputs=1, module__softmax=False, max_epochs=3, lr=0.05,
        batch_size=50, strategy="pipeline", strategy__build="workers", train_split=None,
        verbose=0, random_state=0, scheduler_address=client.scheduler.address).fit(X, y)
    out = net.predict(X)
    assert out.shape == (200,)
    with pytest.warns(UserWarning):
        gathered = net.gather_module()
    np.testing.assert_allclose(out, gathered(torch.from_numpy(X)).detach().numpy()[:, 0],
                               atol=1e-6)
    net.release_stages()


def test_a_refit_lets_go_of_the_last_fits_stages(client):
    X, y = make_classification(200)
    net = _net(client, max_epochs=1).fit(X, y)
    first = net.stages_.run_id
    net.fit(X, y)
    assert net.stages_.run_id != first
    held = client.run(_stages_of, first)
    assert set(held.values()) == {0}
    net.release_stages()


def _stages_held():
    from daskdist.worker import stage_tasks

    return len(stage_tasks._stages)


def _stages_of(run_id):
    from daskdist.worker import stage_tasks

    return sum(1 for k in stage_tasks._stages if k[0] == run_id)


def test_a_lost_stage_stops_the_fit_with_stages_lost(client):
    from daskdist.spec import ModelSpec
    from daskdist.worker import owned_stages
    from daskdist.worker.stages import plan_stages, stage_spec

    spec = ModelSpec(_meta(TinySequential))
    layout = plan_stages(spec, 2)[1]
    with pytest.raises(StagesLost, match="keep the only copy"):
        owned_stages.own_stage(stage_spec(spec, layout), run_id="gone", replica=0,
                               layout=layout, round=4, attempt="a", random_state=0,
                               fresh=False)


# -- sharded checkpoints ------------------------------------------------------------------------
def test_a_sharded_checkpoint_resumes_each_stage_from_its_files(client, tmp_path):
    import json

    from daskdist.callbacks import Checkpoint
    from daskdist.checkpoint import load_checkpoint
    from daskdist.sharded_checkpoint import merge_checkpoint

    X, y = make_classification(320)
    path = tmp_path / "stages"
    whole_run = _net(client, max_epochs=4).fit(X, y)
    first = _net(client, max_epochs=2, callbacks=[("ck", Checkpoint(path))]).fit(X, y)
    index = json.loads((path / "checkpoint.json").read_text())
    assert index["layout"] == "sharded" and index["state"]["epoch"] == 2
    files = sorted(p.name for p in path.iterdir())
    assert files == sorted(["checkpoint.json", *(s["file"] for s in index["shards"])])
    # each stage wrote its own tensors, with their momentum
    assert [sorted({t.split("/")[1].split(".")[0] for t in s["tensors"]})
            for s in index["shards"]] == [["0"], ["2", "4"]]
    assert any(t.endswith("/momentum_buffer") for t in index["shards"][1]["tensors"])
    with pytest.warns(UserWarning):
        saved = params_vector(first.gather_module())
    first.release_stages()

    def resumed(**kwargs):
        net = _net(client, max_epochs=4, **kwargs).fit(X, y, resume=path)
        assert len(net.history) == 4 and net.history[-1, "epoch"] == 4
        with pytest.warns(UserWarning):
            out = params_vector(net.gather_module())
        net.release_stages()
        return out

    with pytest.warns(UserWarning):
        expected = params_vector(whole_run.gather_module())
    whole_run.release_stages()
    np.testing.assert_allclose(resumed(), expected, atol=1e-6)
    # the stages read their tensors by name: a resumed fit may cut the model another way
    np.testing.assert_allclose(resumed(strategy__n_stages=3), expected, atol=1e-5)

    # merged into one file, an ordinary checkpoint: a client-built fit resumes from it
    merged = merge_checkpoint(path, tmp_path / "whole")
    state, meta = load_checkpoint(merged)
    np.testing.assert_array_equal(state.params, saved)
    from daskdist.cli import main

    assert main(["merge-checkpoint", str(path), str(tmp_path / "again")]) == 0
    np.testing.assert_array_equal(load_checkpoint(tmp_path / "again")[0].params, saved)
    assert state.epoch == 2 and len(meta["history"]) == 2
    client_built = _net(client, max_epochs=4, strategy__build="client").fit(X, y, resume=merged)
    np.testing.assert_allclose(params_vector(client_built.module_), expected, atol=1e-5)
    # and the other way round is refused with the reason
    from daskdist.checkpoint import CheckpointError

    with pytest.raises(CheckpointError, match="sharded"):
        DaskNeuralNetClassifier(TinySequential, max_epochs=4, train_split=None, verbose=0,
                                scheduler_address=client.scheduler.address).fit(X, y,
                                                                                resume=path)
    with pytest.raises(CheckpointError, match="holds the whole model in one file"):
        _net(client, max_epochs=4).fit(X, y, resume=merged)


def test_a_damaged_stage_file_is_named_on_resume(client, tmp_path):
    import json

    from daskdist.callbacks import Checkpoint
    from daskdist.checkpoint import CheckpointError

    X, y = make_classification(200)
    path = tmp_path / "stages"
    _net(client, max_epochs=1, callbacks=[("ck", Checkpoint(path))]).fit(X, y).release_stages()
    index = json.loads((path / "checkpoint.json").read_text())
    victim = path / index["shards"][1]["file"]
    data = bytearray(victim.read_bytes())
    data[-1] ^= 0xFF
    victim.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=f"{victim.name} does not match the checksum"):
        _net(client, max_epochs=2).fit(X, y, resume=path)


def test_round_checkpoints_are_refused_for_stages_built_on_workers(client, tmp_path):
    from daskdist.callbacks import Checkpoint

    X, y = make_classification(100)
    with pytest.raises(ValueError, match="saved at epoch ends"):
        _net(client, callbacks=[("ck", Checkpoint(tmp_path, every_rounds=2))]).fit(X, y)


def test_continuing_without_a_checkpoint_is_refused(client):
    X, y = make_classification(100)
    net = _net(client, max_epochs=1).fit(X, y)
    with pytest.raises(ValueError, match="continues only from a sharded checkpoint"):
        net.partial_fit(X, y)
    net.release_stages()


def test_epoch_scoring_predicts_through_the_stages_and_initializers_are_refused(client):
    from skorch.callbacks import EpochScoring, Initializer
    from skorch.dataset import ValidSplit

    X, y = make_classification(300)
    net = _net(client, max_epochs=2, lr=0.2, train_split=ValidSplit(5),
               callbacks=[("f1", EpochScoring("f1_macro", lower_is_better=False,
                                              name="f1"))]).fit(X, y)
    assert all(0 <= f1 <= 1 for f1 in net.history[:, "f1"])
    net.release_stages()
    with pytest.raises(ValueError, match="Initializer callback sets values in module_"):
        _net(client, callbacks=[("init", Initializer("*", nn.init.zeros_))]).fit(X, y)
