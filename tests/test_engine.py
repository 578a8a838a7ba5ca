"""The driver's plumbing: task placement, and sync's state staying on its worker."""

import pickle

import numpy as np
import pytest
import torch
from distributed import get_worker

from daskdist.data.shards import RawShard, make_shard
from daskdist.driver.trainer import Trainer
from daskdist.errors import StateLost
from daskdist.plan import RoundPlan
from daskdist.spec import ModelSpec
from daskdist.state import module_to_state
from daskdist.strategies import Sync
from daskdist.testing import TinyNet
from daskdist.worker.sync_tasks import StepResult, own_state, sync_step


def _where(tag):
    return tag, get_worker().address


def test_queued_tasks_run_on_their_worker_and_fall_back_when_it_is_gone(client):
    workers = sorted(client.scheduler_info()["workers"])
    trainer = Trainer(client, ModelSpec(TinyNet()), Sync(), batch_size=8)
    first = trainer.submit(_where, "a", key="daskdist-test-place-a", worker=workers[1])
    second = trainer.submit(_where, "b", key="daskdist-test-place-b", worker=workers[0])
    gone = trainer.submit(_where, "c", key="daskdist-test-place-c", worker="tcp://127.0.0.1:9")
    futures = trainer.flush()
    assert set(futures) == {first.key, second.key, gone.key}
    assert futures[first.key].result(timeout=30) == ("a", workers[1])
    assert futures[second.key].result(timeout=30) == ("b", workers[0])
    assert futures[gone.key].result(timeout=30)[1] in workers  # not pinned to a dead address
    assert trainer.flush() == {}


def _step(spec, shard, previous, run_id):
    plan = RoundPlan(run_id, 0, 0, 1, 1, 1, 4, 0.1, 0)
    return sync_step(spec, shard, *previous, plan=plan, replica_workers=["w0"])


def test_a_step_result_keeps_its_state_on_its_worker():
    torch.manual_seed(0)
    spec = ModelSpec(TinyNet(), criterion=torch.nn.CrossEntropyLoss(), classifier=True)
    rng = np.random.default_rng(0)
    shard = make_shard(RawShard(rng.normal(size=(16, 20)).astype(np.float32),
                                rng.integers(0, 2, 16)), replica=0)
    module, optimizer = spec.build()
    start = module_to_state(module, optimizer)
    result = _step(spec, shard, [start], "run-a")
    assert isinstance(result, StepResult) and result.state is start

    # a copy that left the worker (to a peer, the client or disk) has the gradient only
    copy = pickle.loads(pickle.dumps(result))
    assert copy.state is None and copy.round == result.round
    np.testing.assert_array_equal(copy.contribution.payload["grad"],
                                  result.contribution.payload["grad"])
    assert len(pickle.dumps(result)) < start.nbytes + result.nbytes // 2

    # read back on its own worker, the state comes from what the worker keeps ...
    after = _step(spec, shard, [result], "run-a")
    plan = RoundPlan("run-a", 0, 0, 2, 2, 1, 4, 0.1, 0)
    back = pickle.loads(pickle.dumps(after))
    assert own_state(back, plan) is after.state
    # ... and anywhere else it is reported lost, which the driver turns into a retry
    with pytest.raises(StateLost, match="replica 0 at round 1"):
        own_state(back, RoundPlan("run-b", 0, 0, 2, 2, 1, 4, 0.1, 0))


@pytest.mark.parametrize("task_name", ["local_steps", "gradient"])
def test_round_tasks_are_bit_identical_wherever_and_whenever_they_run(client, task_name):
    """A retried or recomputed round (another worker, a warm cache) gives the same bits."""
    from daskdist import MLP
    from daskdist.worker import replica

    task = getattr(replica, task_name)
    torch.manual_seed(0)
    module = MLP(20, hidden=(32,), n_outputs=3, dropout=0.3)  # dropout draws from the round seed
    spec = ModelSpec(module, torch.optim.SGD, {"lr": 0.1, "momentum": 0.9},
                     torch.nn.NLLLoss(), log_probs=True, classifier=True)
    X = np.random.default_rng(0).normal(size=(64, 20)).astype(np.float32)
    y = np.arange(64) % 3
    shard = make_shard(RawShard(X, y), replica=0)
    state = module_to_state(*spec.build())
    plan = RoundPlan("bits", 0, 0, 5, 0, 1 if task_name == "gradient" else 4, 8, 0.1, 0,
                     shuffle=True)
    workers = sorted(client.scheduler_info()["workers"])
    # one copy per worker, so that the second run on a worker finds its cached replica
    spec, shard, state = client.scatter([spec, shard, state], broadcast=True, hash=False)
    runs = [client.submit(task, spec, shard, state, plan, workers=[w], pure=False)
            for w in [workers[0], workers[1], workers[0]]]
    payloads = [r.payload for r in client.gather(runs)]
    for other in payloads[1:]:
        for key, value in payloads[0].items():
            if isinstance(value, np.ndarray):
                np.testing.assert_array_equal(other[key], value)


def test_the_trainers_data_keywords_still_work_with_a_deprecation_warning(client):
    from daskdist.data.sources import ShardOptions

    with pytest.warns(DeprecationWarning, match=r"Trainer\(holdout, sharding=...\)"):
        old = Trainer(client, ModelSpec(TinyNet()), Sync(), batch_size=8,
                      sharding="sequential", holdout=0.2)
    assert old.data == ShardOptions(sharding="sequential", holdout=0.2)
