"""What a worker keeps of a fit (``daskdist.worker.runtime``): round results whose copies come
back without their state find it again, and the driver recovers from it."""

from __future__ import annotations

import pickle
import time

import numpy as np
import pytest
import torch

from daskdist.data.shards import RawShard, make_shard
from daskdist.errors import StateLost
from daskdist.plan import RoundPlan
from daskdist.spec import ModelSpec
from daskdist.state import module_to_state
from daskdist.testing import TinyNet
from daskdist.worker import runtime
from daskdist.worker.group_tasks import group_delta, member_round
from daskdist.worker.replica import Contribution
from daskdist.worker.sync_tasks import StepResult, own_state


def _delta_spec():
    torch.manual_seed(0)  # (momentum: the optimizer state the round leaves matters too)
    return ModelSpec(TinyNet(), torch.optim.SGD, {"lr": 0.1, "momentum": 0.9},
                     torch.nn.CrossEntropyLoss(), classifier=True)


def _delta_shard():
    rng = np.random.default_rng(0)
    return make_shard(RawShard(rng.normal(size=(16, 20)).astype(np.float32),
                               rng.integers(0, 3, 16)), replica=0)


def _member_plan(run_id, round_):
    return RoundPlan(run_id, 0, 0, round_, 2 * round_, 2, 4, 0.1, 0, compression="fp16")


def _member(spec, shard, own, groups, run_id, round_):
    return member_round(spec, shard, own, groups, plan=_member_plan(run_id, round_),
                        replica_workers=["w0"])


def _assert_same_round(a, b):
    np.testing.assert_array_equal(a.state.params, b.state.params)
    np.testing.assert_array_equal(a.optimizer["state"][0]["momentum_buffer"],
                                  b.optimizer["state"][0]["momentum_buffer"])
    np.testing.assert_array_equal(a.contribution.payload["delta"],
                                  b.contribution.payload["delta"])


def test_a_round_results_copy_finds_its_state_on_the_worker_that_made_it():
    spec, shard = _delta_spec(), _delta_shard()
    start = module_to_state(*spec.build())
    first = _member(spec, shard, start, (), "run-d", 0)
    groups = (group_delta(first, group=0, plan=first.plan),)
    # a copy that left the worker has the delta only (and the token of its original) ...
    copy = pickle.loads(pickle.dumps(first))
    assert copy.state is None and copy.optimizer is None and copy.token == first.token

    # ... and back on the worker that made it, the next round finds the original's state
    via_copy = _member(spec, shard, copy, groups, "run-d", 1)
    direct = _member(spec, shard, first, groups, "run-d", 1)
    _assert_same_round(via_copy, direct)
    # the worker keeps each replica's two newest results: an older one is lost, never
    # mistaken for another
    later = _member(spec, shard, direct, (group_delta(direct, group=0, plan=direct.plan),),
                    "run-d", 2)
    _member(spec, shard, later, (group_delta(later, group=0, plan=later.plan),), "run-d", 3)
    with pytest.raises(StateLost, match="replica 0 at round 0"):
        _member(spec, shard, copy, groups, "run-d", 1)
    # nor is a result of another fit, or one of a fit whose results were dropped
    other = pickle.loads(pickle.dumps(_member(spec, shard, start, (), "run-e", 0)))
    runtime.drop_run("run-e")
    with pytest.raises(StateLost, match="replica 0 at round 0"):
        _member(spec, shard, other, groups, "run-e", 1)
    # a copy made elsewhere, whose original is not this one, is not taken for it
    stranger = pickle.loads(pickle.dumps(_member(spec, shard, start, (), "run-f", 0)))
    stranger.token = "another"
    with pytest.raises(StateLost):
        _member(spec, shard, stranger, groups, "run-f", 1)
    runtime.drop_run("run-d")
    runtime.drop_run("run-f")


def test_a_sync_step_run_away_from_its_worker_takes_a_peers_state():
    state = module_to_state(*_delta_spec().build())
    plan = RoundPlan("run-s", 0, 0, 1, 1, 1, 4, 0.1, 0)
    grad = Contribution(0, 4.0, {}, 0.0, 1, 0.0, 0.0, 0.0, None)
    # replica 0's result of round 0 was made on another worker: its copy comes without state
    mine = pickle.loads(pickle.dumps(StepResult(state, grad, 0)))
    with pytest.raises(StateLost, match="replica 0 at round 0"):
        own_state(mine, plan)
    # replica 1, on this worker, holds the same state at round 0 (every replica steps alike)
    runtime.keep("run-s", 1, 0, StepResult(state, grad, 0))
    assert own_state(mine, plan) is state
    runtime.drop_run("run-s")


def test_the_store_keeps_two_rounds_per_replica_and_forgets_an_attempt_given_up():
    for r in range(4):
        runtime.keep("run-s", 0, r, f"state {r}")
    runtime.keep("run-s", runtime.GLOBAL, 2, "shared")
    assert runtime.kept_index("run-s") == [(2, runtime.GLOBAL), (2, 0), (3, 0)]
    assert runtime.kept("run-s", 0, 1) is None and runtime.kept_state("run-s", 3, 0) == "state 3"
    runtime.forget_from("run-s", 3)
    assert runtime.kept_index("run-s") == [(2, runtime.GLOBAL), (2, 0)]
    runtime.drop_run("run-s")
    assert runtime.kept_index("run-s") == []


def _state(result):
    return result.state


def _drop_copy(key, address, dask_scheduler=None):
    """Have the active memory manager drop the copy of ``key`` on ``address`` (on the scheduler).

    As its ``ReduceReplicas`` policy does for a key held by several workers,
    choosing the one that holds the most memory.
    """
    from distributed.active_memory_manager import (
        ActiveMemoryManagerExtension,
        ActiveMemoryManagerPolicy,
        Suggestion,
    )

    class DropThere(ActiveMemoryManagerPolicy):
        def run(self):
            yield Suggestion("drop", dask_scheduler.tasks[key],
                             {dask_scheduler.workers[address]})

    ActiveMemoryManagerExtension(dask_scheduler, {DropThere()}, register=False,
                                 start=False).run_once()


def test_a_round_finds_its_state_when_the_scheduler_dropped_its_workers_copy(client):
    """Compressed hierarchical: the group's worker fetched a replica's result, and the scheduler
    dropped the replica's own copy, so its next round gets the result back without its state.

    (Dask's active memory manager does that on its own, every 2 s, to keys held twice; it made
    the kill test of compressed ``hierarchical`` recover a second time now and then.)
    """
    own, leader = sorted(client.scheduler_info()["workers"])[:2]
    spec, shard = _delta_spec(), _delta_shard()
    start = module_to_state(*spec.build())
    # where the state never leaves the worker
    first = _member(spec, shard, start, (), "run-amm", 0)
    groups = (group_delta(first, group=0, plan=first.plan),)
    reference = _member(spec, shard, first, groups, "run-amm", 1)
    runtime.drop_run("run-amm")

    running = client.amm.running()
    client.amm.stop()  # (so that the scheduler drops the copy named here, and no other)
    try:
        remote = client.scatter([spec, shard, start], workers=[own], hash=False)
        member = client.submit(member_round, *remote, (), pure=False,
                               plan=_member_plan("run-amm", 0), replica_workers=[own],
                               workers=[own])
        group = client.submit(group_delta, member, group=0, plan=_member_plan("run-amm", 0),
                              workers=[leader], pure=False)
        group.result(timeout=60)
        assert set(client.who_has(member)[member.key]) == {own, leader}
        client.run_on_scheduler(_drop_copy, member.key, own)
        deadline = time.monotonic() + 30
        while set(client.who_has(member)[member.key]) != {leader}:
            assert time.monotonic() < deadline, client.who_has(member)
            time.sleep(0.05)
        after = client.submit(member_round, *remote[:2], member, (group,), pure=False,
                              plan=_member_plan("run-amm", 1), replica_workers=[own],
                              workers=[own])
        assert after.result(timeout=60).state is None  # (what came back: a copy)
        state = client.submit(_state, after, workers=[own], pure=False).result(timeout=60)
        np.testing.assert_array_equal(state.params, reference.state.params)
    finally:
        if running:
            client.amm.start()
        client.run(runtime.drop_run, "run-amm")


def test_a_round_computed_again_reads_the_part_its_predecessor_left():
    """Own parts are kept by round, not consumed: a round run twice reads the same memory,
    and rounds run again from an earlier state replace the attempt given up."""
    from daskdist.state import TrainingState
    from daskdist.worker import own_state

    run, owner = "own-test", own_state.replica_owner(1)
    try:
        assert own_state.part_for(run, owner, 0) == {}  # the fit's first round
        for r in range(5):
            part = own_state.part_for(run, owner, r)
            part["residual"] = np.full(3, float(r), np.float32)
            own_state.keep_part(run, owner, r, part)
        # round 4 again (Dask recomputed it): the residual round 3 left, both times
        for _ in range(2):
            np.testing.assert_array_equal(own_state.part_for(run, owner, 4)["residual"], 3.0)
        # a recovery goes back to round 3: what round 4 left is stale, round 2's is current
        again = own_state.part_for(run, owner, 3)
        np.testing.assert_array_equal(again["residual"], 2.0)
        again["residual"] = np.full(3, 20.0, np.float32)
        own_state.keep_part(run, owner, 3, again)
        assert own_state.part_for(run, owner, 5) == {}  # round 4 has not run again yet
        np.testing.assert_array_equal(own_state.part_for(run, owner, 4)["residual"], 20.0)
        # a state that carries the parts (an epoch's start, a resumed checkpoint) comes first
        start = TrainingState(np.zeros(2, np.float32), round=3,
                              own={owner: {"residual": np.full(3, 7.0, np.float32)}})
        np.testing.assert_array_equal(
            own_state.part_for(run, owner, 3, start)["residual"], 7.0)
    finally:
        own_state.drop_parts(run)
    assert own_state.parts_at(run, 2) == {}


def test_a_part_is_empty_when_the_next_round_does_not_depend_on_it():
    from daskdist.worker.own_state import is_empty

    assert is_empty({}) and is_empty({"residual": None, "scaler": None})
    assert not is_empty({"residual": np.zeros(3, np.float32)})
    assert is_empty({"optimizer": {"state": {}, "param_groups": [{"lr": 0.1}]}})  # plain SGD
    assert not is_empty({"optimizer": {"state": {0: {"momentum_buffer": np.ones(2)}}}})
    fresh = torch.amp.GradScaler("cpu")
    assert is_empty({"scaler": fresh.state_dict()})
    fresh.scale(torch.ones(1))
    fresh.update(new_scale=1024.0)
    assert not is_empty({"scaler": fresh.state_dict()})
