"""``pipeline``: the model's stages on different workers, micro-batches flowing between."""

import numpy as np
import pytest
import torch
from torch import nn

from daskdist import DaskNeuralNetClassifier
from daskdist.driver.trainer import Trainer
from daskdist.spec import ModelSpec
from daskdist.state import module_to_state, params_vector
from daskdist.strategies import Pipeline
from daskdist.strategies.pipeline import stage_grid
from daskdist.testing import TinyBlockStack, TinyNet, TinySequential, make_classification
from daskdist.worker.stages import (
    balanced_split,
    join_states,
    plan_stages,
    split_state,
    stage_spec,
)


def _net(client, strategy, module=TinySequential, **kwargs):
    params = dict(max_epochs=2, lr=0.05, batch_size=64, optimizer__momentum=0.9,
                  iterator_train__shuffle=True, strategy=strategy, train_split=None, verbose=0,
                  random_state=0, scheduler_address=client.scheduler.address)
    return DaskNeuralNetClassifier(module, **{**params, **kwargs})


# -- where the stages split, and the state with them ---------------------------------------
def test_balanced_split_evens_out_parameters_and_keeps_activations_with_their_layer():
    assert balanced_split([10, 0, 10, 0], 2) == [2]
    assert balanced_split([5, 5, 5, 5, 5, 5], 3) == [2, 4]
    assert balanced_split([1, 0, 100, 0, 1, 0], 3) == [2, 4]
    assert balanced_split([100, 1, 1, 1], 2) == [1]
    with pytest.raises(ValueError, match="Cannot split 2 children into 3"):
        balanced_split([1, 1], 3)


def test_plan_stages_splits_where_told_or_balanced():
    # Linear(20, 16), Tanh, Linear(16, 16), Tanh, Linear(16, 3), Softmax
    spec = ModelSpec(TinySequential())
    balanced = plan_stages(spec, 2)
    assert [layout.children for layout in balanced] == [("0", "1"), ("2", "3", "4", "5")]
    three = plan_stages(spec, 3, split_points=[2, 4])
    assert [layout.children for layout in three] == [("0", "1"), ("2", "3"), ("4", "5")]
    # the stages' slices tile the flat parameter vector, in order
    n = sum(p.numel() for p in spec.module.parameters())
    assert [x.slices for x in three] == [((0, 336),), ((336, 608),), ((608, n),)]


def test_a_module_with_stages_is_split_at_its_declared_units():
    torch.manual_seed(0)
    module = TinyBlockStack(n_blocks=3)
    spec = ModelSpec(module, torch.optim.SGD, {"momentum": 0.9})
    layouts = plan_stages(spec, 3, split_points=[2, 4])
    assert [x.children for x in layouts] == [("embed", "blocks.0"), ("blocks.1", "blocks.2"),
                                             ("head",)]
    # the head is registered first: its parameters lead the flat vector, the last stage's
    head = sum(p.numel() for p in module.head.parameters())
    assert layouts[2].slices == ((0, head),) and layouts[0].slices[0][0] == head
    # each stage's module runs its units in order, named as in the whole model
    x = torch.randn(5, 20)
    out = x
    for layout in layouts:
        stage = stage_spec(spec, layout).module
        assert {n.rsplit(".", 1)[0].split(".")[0] for n, _ in stage.named_parameters()} <= {
            "embed", "blocks", "head"}
        out = stage(out)
    torch.testing.assert_close(out, module(x))
    # the state splits into the stages' parts and joins back whole
    state = module_to_state(*spec.build())
    whole = join_states(state, [split_state(state, x) for x in layouts], layouts)
    np.testing.assert_array_equal(whole.params, state.params)
    assert sum(x.n_params for x in layouts) == state.params.size


class _Units(nn.Module):
    def __init__(self, declared):
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)
        self.declared = declared

    def stages(self):
        return self.declared(self)


@pytest.mark.parametrize("declared, message", [
    (lambda m: [m.a], r"leaves out \['b.weight', 'b.bias'\]"),
    (lambda m: [m.a, m.a, m.b], "returns 'a' twice"),
    (lambda m: [m.a, nn.Linear(4, 4), m.b], "must return sub-modules of the model"),
    (lambda m: [m, m.a], "must return sub-modules of the model"),
])
def test_stages_that_do_not_cover_the_model_are_refused(declared, message):
    with pytest.raises(ValueError, match=message):
        plan_stages(ModelSpec(_Units(declared)), 2)


@pytest.mark.parametrize("module, n_stages, points, message", [
    (TinyNet(), 2, None, "splits a torch.nn.Sequential.*TinyNet, which has neither.*stages()"),
    (TinySequential(), 7, None, "n_stages=7 is more than the 6 children"),
    (TinySequential(), 2, [0], "must increase strictly and lie in 1..5"),
    (TinySequential(), 3, [4, 2], "must increase strictly"),
    (TinySequential(), 3, [2], r"give 2 stages, but n_stages=3"),
    (TinySequential(), 2, ["2"], "child indices"),
    (TinySequential(), 2, [5], r"Stage 1 \(children \['5'\]\) has no parameters"),
])
def test_plan_stages_refuses_what_it_cannot_split(module, n_stages, points, message):
    with pytest.raises(ValueError, match=message):
        plan_stages(ModelSpec(module), n_stages, points)


def test_plan_stages_refuses_a_parameter_shared_by_two_stages():
    first, last = nn.Linear(4, 4), nn.Linear(4, 4)
    last.weight = first.weight  # tied weights
    with pytest.raises(ValueError, match="shared with stage 0"):
        plan_stages(ModelSpec(nn.Sequential(first, nn.Tanh(), last)), 2, [2])


def test_split_and_join_give_back_the_whole_state():
    torch.manual_seed(0)
    module = TinySequential()
    # two parameter groups (skorch's patterns), one of them only in the last stage
    spec = ModelSpec(module, torch.optim.Adam,
                     {"param_groups": [("4.*", {"lr": 0.01})], "lr": 0.001})
    built, optimizer = spec.build()
    built(torch.randn(8, 20)).sum().backward()
    optimizer.step()
    state = module_to_state(built, optimizer, step=1, round=1)
    layouts = plan_stages(spec, 3, [2, 4])
    parts = [split_state(state, layout) for layout in layouts]
    # a stage's optimizer has every group (maybe empty) and only its parameters' state
    assert [len(p.optimizer["state"]) for p in parts] == [2, 2, 2]
    assert [[len(g["params"]) for g in p.optimizer["param_groups"]] for p in parts] == [
        [0, 2], [0, 2], [2, 0]]
    whole = join_states(state, parts[::-1], layouts)
    np.testing.assert_array_equal(whole.params, state.params)
    assert whole.optimizer["param_groups"] == state.optimizer["param_groups"]
    for i, entry in state.optimizer["state"].items():
        for name, value in entry.items():
            np.testing.assert_array_equal(whole.optimizer["state"][i][name], value)
    # a stage's optimizer loads its part as a live optimizer of the stage's module
    from daskdist.state import optimizer_state_from_numpy
    from daskdist.worker.stages import build_stage

    stage_module, stage_optimizer = build_stage(stage_spec(spec, layouts[2]), layouts[2])
    optimizer_state_from_numpy(stage_optimizer, parts[2].optimizer)
    assert [g["lr"] for g in stage_optimizer.param_groups] == [0.01, 0.001]
    assert [n for n, _ in stage_module.named_parameters()] == ["4.weight", "4.bias"]


def test_stage_grid_gives_each_stage_its_own_worker_when_there_are_enough():
    workers = ["a", "b", "c", "d"]
    assert stage_grid(["a", "c"], workers, 2) == [["a", "b"], ["c", "d"]]
    assert stage_grid(["a"], workers[:2], 3) == [["a", "b", "a"]]
    assert Pipeline(n_stages=2).replicas_for(5) == 2
    assert Pipeline(n_stages=3).place_replicas(workers, 2) == ["a", "d"]


@pytest.mark.parametrize("options, message", [
    ({"n_stages": 0}, "n_stages must be a positive integer"),
    ({"n_micro_batches": 1.5}, "n_micro_batches must be a positive integer"),
    ({"n_stages": 3, "split_points": [2]}, "give 2 stages, but n_stages=3"),
    ({"schedule": "interleaved"}, r"schedule must be one of \['gpipe', '1f1b'\]"),
])
def test_pipeline_options_are_checked(options, message):
    with pytest.raises(ValueError, match=message):
        Pipeline(**options)


# -- on the cluster ---------------------------------------------------------------------------
@pytest.mark.parametrize("n_stages, n_micro, n_replicas, batch_size, schedule", [
    (2, 4, None, 64, "gpipe"),  # one pipeline of two stages, a stage per worker
    (3, 3, None, 50, "gpipe"),  # three stages on two workers; micro-batches of 17, 17, 16 rows
    (2, 4, 2, 37, "gpipe"),  # two pipelines (data parallelism too); slices of 19 and 18 rows
    (3, 7, None, 64, "1f1b"),  # more micro-batches than stages: stages wait for backwards
    (2, 5, 2, 37, "1f1b"),  # two 1F1B pipelines
    (3, 4, None, 64, "blocks"),  # a TinyBlockStack split at its stages()
])
def test_pipeline_equals_sync(client, n_stages, n_micro, n_replicas, batch_size, schedule):
    X, y = make_classification(600)
    kwargs = dict(batch_size=batch_size, n_replicas=n_replicas or 1)
    if schedule == "blocks":
        kwargs["module"], schedule = TinyBlockStack, "1f1b"
    sync = _net(client, "sync", **kwargs).fit(X, y)
    pipe = _net(client, "pipeline", strategy__n_stages=n_stages, strategy__schedule=schedule,
                strategy__n_micro_batches=n_micro, **kwargs).fit(X, y)
    np.testing.assert_allclose(params_vector(pipe.module_), params_vector(sync.module_),
                               atol=1e-5)
    np.testing.assert_allclose(pipe.history[:, "train_loss"], sync.history[:, "train_loss"],
                               rtol=1e-5)
    for column in ("round", "epoch", "replicas", "samples"):
        assert pipe.rounds_[column].tolist() == sync.rounds_[column].tolist()
    np.testing.assert_allclose(pipe.rounds_["loss"], sync.rounds_["loss"], rtol=1e-4)
    # the optimizer state (momentum) came back whole too
    n_tensors = len(list(pipe.module_.parameters()))
    assert pipe.optimizer_.state_dict()["param_groups"][0]["params"] == list(range(n_tensors))
    momenta = pipe.optimizer_.state_dict()["state"]
    for i, entry in sync.optimizer_.state_dict()["state"].items():
        torch.testing.assert_close(momenta[i]["momentum_buffer"], entry["momentum_buffer"],
                                   atol=1e-5, rtol=1e-4)
    # activations and gradients crossed workers
    assert (pipe.rounds_["bytes"] > 0).all()


def test_1f1b_bounds_the_activations_a_stage_holds(client):
    """Stage ``s`` of ``S`` holds at most ``S - s`` micro-batches' activations under 1F1B.

    The bytes are what autograd saved for the backward passes
    (``saved_tensors_hooks``); a stage's bytes for one micro-batch of 8 rows
    are measured with batches of 8 rows that are not split.
    """
    X, y = make_classification(640)  # ten batches of 64 rows

    def peaks(X, y, batch_size, n_micro, schedule):
        net = _net(client, "pipeline", max_epochs=1, batch_size=batch_size,
                   strategy__n_stages=3, strategy__split_points=[2, 4],
                   strategy__n_micro_batches=n_micro, strategy__schedule=schedule).fit(X, y)
        return np.array(net.rounds_["activation_bytes"].tolist()).max(axis=0)

    per_micro = peaks(X[:64], y[:64], 8, 1, "gpipe")
    assert (per_micro > 0).all()
    one_f_one_b, gpipe = peaks(X, y, 64, 8, "1f1b"), peaks(X, y, 64, 8, "gpipe")
    assert (one_f_one_b <= np.array([3, 2, 1]) * per_micro).all(), (one_f_one_b, per_micro)
    assert one_f_one_b[-1] == per_micro[-1]  # the last stage goes backward at once
    assert (gpipe <= 8 * per_micro).all()
    assert (one_f_one_b >= per_micro).all()
    # other strategies keep no stages
    assert _net(client, "sync", max_epochs=1).fit(X, y).rounds_["activation_bytes"].map(
        len).eq(0).all()


def test_saved_activations_count_each_tensor_once_and_skip_parameters():
    from daskdist.worker.stage_tasks import SavedActivations

    module = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))
    x = torch.randn(4, 5)
    with SavedActivations(list(module.parameters())) as saved:
        module(x).sum().backward()
    # the input (4 x 5) and the Tanh output (4 x 7, saved by Tanh and the last Linear)
    assert saved.nbytes == 4 * (4 * 5 + 4 * 7)


def test_bf16_activations_and_their_gradients_travel_in_half_the_bytes(client):
    from daskdist.worker.stage_tasks import BFloat16Array, from_wire, to_wire

    out = torch.randn(5, 3).to(torch.bfloat16)
    wire = to_wire(out)
    assert isinstance(wire, BFloat16Array) and wire.nbytes == 5 * 3 * 2
    assert torch.equal(from_wire(wire), out)
    assert to_wire(out.float()).dtype == np.float32
    X, y = make_classification(600)
    full = _net(client, "pipeline").fit(X, y)
    half = _net(client, "pipeline", precision="bf16").fit(X, y)
    # the cut is after Linear(20, 16) and Tanh: 16 activations per row go forward and their
    # gradients come back, 2 bytes each instead of 4 (targets and the state are unchanged)
    saved = full.rounds_["bytes"] - half.rounds_["bytes"]
    assert saved.tolist() == (2 * 2 * 16 * full.rounds_["samples"]).tolist()
    assert abs(half.score(X, y) - full.score(X, y)) < 0.05


def test_each_worker_holds_only_its_stage(client):
    from daskdist.worker import replica, stage_tasks

    X, y = make_classification(600)
    module = TinySequential()
    spec = ModelSpec(module, torch.optim.SGD, {"momentum": 0.9}, nn.NLLLoss(), log_probs=True,
                     classifier=True)
    state = module_to_state(*spec.build())
    trainer = Trainer(client, spec, Pipeline(n_stages=2), batch_size=64).start(X, y, state)
    try:
        trainer.run_epoch(0.05)

        def held(run_id):
            stages = {k[1:]: (sum(p.numel() for p in s.params),
                              [n for n, _ in s.module.named_parameters()],
                              len(s.optimizer.state))
                      for k, s in stage_tasks._stages.items() if k[0] == run_id}
            replicas = [k for k in replica._cache if k[0] == run_id]
            return stages, replicas

        found = client.run(held, trainer.run_id)
        layouts = trainer.scratch["fit"].layouts
        grid = stage_grid(trainer.replica_workers, sorted(found), 2)
        assert len({w for row in grid for w in row}) == 2  # a worker per stage
        for s, worker in enumerate(grid[0]):
            stages, replicas = found[worker]
            # the stage alone: its parameters, and momentum for those only; no whole model
            assert list(stages) == [(0, s)]
            n_params, names, n_momenta = stages[(0, s)]
            assert n_params == layouts[s].n_params < params_vector(module).size
            assert {n.split(".")[0] for n in names} <= set(layouts[s].children)
            assert n_momenta == len(names)
            assert replicas == []
    finally:
        trainer.close()
    assert set(client.run(_stages_held).values()) == {0}


def _stages_held():
    from daskdist.worker import stage_tasks

    return len(stage_tasks._stages)


def test_pipeline_learns_digits_from_the_estimator(client, digits):
    X, y = digits
    net = _net(client, "pipeline", max_epochs=5, lr=0.1, batch_size=64,
               module__n_features=64, module__hidden=32, module__n_outputs=10,
               strategy__n_micro_batches=2).fit(X, y)
    assert net.score(X, y) > 0.9
    assert net.rounds_["round"].tolist() == list(range(len(net.rounds_)))
    assert (net.rounds_["compute_s"] > 0).all()
    assert net.predict_proba(X[:5]).shape == (5, 10)


def test_pipeline_refuses_a_module_that_is_not_sequential(client):
    X, y = make_classification(100)
    net = _net(client, "pipeline")
    net.set_params(module=TinyNet)
    with pytest.raises(ValueError, match="splits a torch.nn.Sequential"):
        net.fit(X, y)


def test_loading_a_stage_drops_what_a_given_up_attempt_left():
    from types import SimpleNamespace

    from daskdist.worker import stage_tasks

    spec = ModelSpec(TinySequential(), torch.optim.SGD, {"momentum": 0.9})
    state = module_to_state(*spec.build())
    layouts = plan_stages(spec, 2)
    try:
        args = dict(run_id="given-up", replica=0, layout=layouts[1], round=3)
        specs = stage_spec(spec, layouts[1])
        stage_tasks.load_stage(specs, split_state(state, layouts[1]), attempt="first", **args)
        stage = stage_tasks._stages[("given-up", 0, 1)]
        for p in stage.params:  # a backward pass of the first attempt, never stepped
            p.grad = torch.ones_like(p)
        stage.saved[0] = "graph"
        stage_tasks.load_stage(specs, split_state(state, layouts[1]), attempt="again", **args)
        assert all(p.grad is None for p in stage.params) and stage.saved == {}
        with pytest.raises(Exception, match="loaded for attempt again, not first"):
            stage.at(3, "first", "update")
        # a recovery that moved stage 1 elsewhere: this worker lets go of it
        here = SimpleNamespace(address="tcp://here:1")
        assert stage_tasks.keep_stages("given-up", [["tcp://here:1", "tcp://there:2"]],
                                       dask_worker=here) == 1
        assert ("given-up", 0, 1) not in stage_tasks._stages
    finally:
        stage_tasks.drop_run("given-up")
