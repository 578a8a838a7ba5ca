"""Balanced replicas: local steps and shard sizes that follow each replica's measured speed.

The arithmetic (:mod:`daskdist.driver.balance`) is checked as pure
functions; the fits pace one of the session cluster's two workers three
times slower than the other (``daskdist.testing.PacedNet``), so that the
scenario, not the machine, sets the speeds.
"""

from __future__ import annotations

import numpy as np
import pytest

from daskdist import DaskNeuralNetClassifier
from daskdist.driver import balance
from daskdist.driver.reshard import steps_per_epoch
from daskdist.plan import RoundPlan, StepTable
from daskdist.strategies import LocalSGD
from daskdist.testing import PacedNet


def test_local_steps_follow_batches_per_second():
    assert balance.local_steps([300.0, 100.0], [32, 32], 8) == [12, 4]
    # whole steps that spread round times least, their mean near sync_every
    assert balance.local_steps([300.0, 300.0, 300.0, 100.0], [16] * 4, 8) == [9, 9, 9, 3]
    assert balance.local_steps([100.0, 100.0, 100.0], [32] * 3, 8) == [8, 8, 8]
    # per batch: a replica with twice the batch and twice the speed takes the same steps
    assert balance.local_steps([200.0, 100.0], [64, 32], 8) == [8, 8]
    assert balance.local_steps([310.0, 290.0, 305.0, 100.0], [16] * 4, 8) == [10, 9, 10, 3]
    assert balance.local_steps([1000.0, 1.0], [32, 32], 4) == [12, 1]  # at least 1, at most 3x


def test_measured_speeds_read_the_round_log():
    log = [{"round": 3, "per_replica": ((0, 1.0, 64, 0.5), (1, 1.0, 64, 1.5))},
           {"round": 4, "per_replica": ((0, 1.0, 64, 0.5), (1, 1.0, 64, 1.5))},
           {"round": 5, "per_replica": ((0, 1.0, 0, 0.0),)}]
    assert balance.measured_speeds(log) == {0: 128.0, 1: 128 / 3}
    assert balance.measured_speeds(log, since_round=5) == {}


def test_steps_per_epoch_of_balanced_replicas():
    assert steps_per_epoch([900, 300], [32, 32]) == 29
    # 900 rows in 12 steps a round of 32: 29 steps, 3 rounds; 300 in 4-step rounds: 3 rounds
    assert steps_per_epoch([900, 300], [32, 32], [12, 4], round_steps=8) == 24
    assert steps_per_epoch([900, 400], [32, 32], [12, 4], round_steps=8) == 32


def test_a_balanced_replica_reads_the_schedule_at_the_epochs_progress():
    table = StepTable((("lr", None),), np.arange(16, dtype=float).reshape(16, 1, 1))
    plan = RoundPlan(run_id="r", replica=1, epoch=0, round=1, first_step=4, n_steps=4,
                     batch_size=8, lr=0.1, random_state=0, schedule=table, schedule_stride=2.0)
    # its 4 steps of round 1 stand for the round's steps 8..15
    assert [plan.hyper(k)[0]["lr"] for k in range(4)] == [8.0, 10.0, 12.0, 14.0]


@pytest.mark.parametrize("options, match", [
    ({"balance": "yes"}, "balance must be True or False"),
    ({"balance": True, "deadline": 2.0}, "balance=True cannot be combined"),
    ({"balance": True, "overlap": True}, "balance=True cannot be combined"),
])
def test_balance_refuses_what_it_cannot_plan(options, match):
    with pytest.raises(ValueError, match=match):
        LocalSGD(**options)


@pytest.mark.timeout(240)
@pytest.mark.parametrize("strategy, streamed", [("local_sgd", False), ("hierarchical", False),
                                               ("diloco", False), ("local_sgd", True)])
def test_balanced_replicas_finish_their_rounds_together(session_client, digits, strategy,
                                                        streamed):
    import dask.array as da

    client = session_client
    X, y = digits
    # streamed shards are balanced in whole chunks
    data = ((da.from_array(X, chunks=(60, -1)), da.from_array(y, chunks=60)) if streamed
            else (X, y))
    slow = sorted(client.scheduler_info(n_workers=-1)["workers"])[0]
    options = {}
    if strategy == "diloco":  # its outer step as local_sgd's average
        options = {"strategy__outer_momentum": 0.0, "strategy__outer_lr": 1.0,
                   "strategy__nesterov": False}
    net = DaskNeuralNetClassifier(
        PacedNet, module__n_features=64, module__hidden=32, module__n_outputs=10,
        module__sample_time=0.0005, module__slow_worker=slow, module__slowdown=3.0,
        max_epochs=3, batch_size=64, lr=0.2, strategy=strategy, sync_every=8,
        strategy__balance=True, train_split=None, verbose=0, random_state=0,
        streaming=streamed, scheduler_address=client.scheduler.address, **options).fit(*data)
    rounds = net.rounds_
    first = rounds[rounds["epoch"] == 0]
    later = rounds[rounds["epoch"] >= 1]
    # unbalanced, the slow replica computes about three times as long per round
    spread = [max(c) / min(c) for c in first["replica_compute_s"] if len(c) == 2]
    assert np.median(spread) > 2.0
    # balanced, they finish together: its local steps and rows are a third of the other's
    spread = [max(c) / min(c) - 1 for c in later["replica_compute_s"] if len(c) == 2]
    assert np.median(spread) <= 0.15
    per_replica = later["samples"].sum()
    assert per_replica == 2 * len(X)  # every row, once per epoch
    assert rounds.groupby("epoch")["samples"].sum().tolist() == [len(X)] * 3
    assert net.score(X, y) > 0.8
