"""The driver with a scripted strategy and no torch model: what it hands a strategy, and
what it does with what the strategy tracks, finishes and reports lost."""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import pytest

from daskdist.data.sources import ShardOptions
from daskdist.driver.trainer import Trainer
from daskdist.errors import WorkerLost
from daskdist.state import TrainingState
from daskdist.strategies.base import Strategy


@dataclass
class FakeSpec:
    """All the driver needs of a model specification."""

    device: str = "cpu"


def add_round(spec, shard, state: TrainingState, round_: int, epoch: int) -> TrainingState:
    """A round that adds the shard's row count to the parameters, and logs itself."""
    record = {"round": round_, "epoch": epoch, "replicas": (0,), "skipped": (), "samples": 1,
              "steps": 1, "loss_sum": float(len(shard)), "bytes": 0, "compute_s": 0.0,
              "t_start": 0.0, "t_end": 0.0}
    log = state.log if state.log and state.log[-1]["epoch"] == epoch else ()
    return replace(state, params=state.params + len(shard), round=round_ + 1,
                   log=log + (record,))


def close(state: TrainingState, epoch: int) -> TrainingState:
    return replace(state, epoch=epoch + 1)


class Scripted(Strategy):
    """Runs ``rounds`` rounds an epoch on replica 0's shard; can be told to lose a worker."""

    name = "scripted"

    def __init__(self, rounds: int = 3, lose_at: int | None = None, rounds_lost=None):
        self.rounds, self.lose_at, self.rounds_lost = rounds, lose_at, rounds_lost
        self.seen = []

    def round_sizes(self, steps_per_epoch):
        return [1] * self.rounds

    def train_epoch(self, ctx):
        info = ctx.info
        self.seen.append(info)
        state = ctx.state
        for r in range(info.round, info.first_round + self.rounds):
            if r == self.lose_at:
                self.lose_at = None  # once
                ctx.lost(f"scripted loss at round {r}", self.rounds_lost)
            state = ctx.submit(add_round, ctx.spec, ctx.shards[0], state, r, info.epoch,
                               key=ctx.key("round", r, 0), worker=info.replica_workers[0])
            state = ctx.flush(state)
            ctx.track(r + 1, state)
            ctx.wait([state])  # (one round at a time: those before a loss are done)
        final = ctx.submit(close, state, info.epoch, key=ctx.key("close"), worker=None,
                           queue=False)
        ctx.finish(final, info.first_round + self.rounds)


def _trainer(client, strategy):
    X = np.zeros((40, 2), dtype=np.float32)
    state = TrainingState(params=np.zeros(3, dtype=np.float32), buffers={}, optimizer={})
    trainer = Trainer(client, FakeSpec(), strategy, batch_size=4, n_replicas=2,
                      data=ShardOptions(sharding="sequential", convert={"x_dtype": None}))
    return trainer.start(X, None, state)


def test_the_driver_hands_each_epoch_to_the_strategy_and_keeps_what_it_finishes(client):
    strategy = Scripted(rounds=3)
    trainer = _trainer(client, strategy)
    try:
        first = trainer.run_epoch(0.5)
        second = trainer.run_epoch(0.25)
    finally:
        trainer.close()
    # what the strategy saw of the driver
    assert [(i.epoch, i.first_round, i.round, i.done, i.lr) for i in strategy.seen] == \
        [(0, 0, 0, 0, 0.5), (1, 3, 3, 0, 0.25)]
    info = strategy.seen[0]
    assert info.shard_sizes == (20, 20) and info.replica_batch == (2, 2)
    assert len(set(info.replica_workers)) == 2 and info.model == FakeSpec()
    assert info.start.round == 0 and strategy.seen[1].start.round == 3
    # the finished state became the epoch's result, and the next epoch's start
    np.testing.assert_array_equal(first.state.params, [60, 60, 60])
    np.testing.assert_array_equal(second.state.params, [120, 120, 120])
    assert (first.epoch, first.state.epoch, second.state.round) == (0, 1, 6)
    assert [r["round"] for r in first.rounds + second.rounds] == list(range(6))
    assert trainer.recoveries == []


@pytest.mark.parametrize("rounds_lost, expected", [(None, 0), (2, 2)])
def test_a_lost_worker_is_recovered_from_the_newest_state_the_driver_holds(
        client, rounds_lost, expected):
    strategy = Scripted(rounds=4, lose_at=2, rounds_lost=rounds_lost)
    trainer = _trainer(client, strategy)
    try:
        result = trainer.run_epoch(0.5)
    finally:
        trainer.close()
    # the second attempt continued from round 2, in a new generation of task keys
    first, second = strategy.seen
    assert (first.round, second.round, second.first_round) == (0, 2, 0)
    assert second.attempt != first.attempt and second.done == 2
    assert trainer.recoveries == [{"epoch": 0, "round": 2, "rounds_lost": expected,
                                   "reason": "scripted loss at round 2"}]
    # every round applied once
    np.testing.assert_array_equal(result.state.params, [80, 80, 80])
    assert [r["round"] for r in result.rounds] == [0, 1, 2, 3]


def test_a_strategy_that_does_not_finish_its_epoch_is_named(client):
    class Unfinished(Scripted):
        def train_epoch(self, ctx):
            pass

    trainer = _trainer(client, Unfinished())
    try:
        with pytest.raises(RuntimeError, match="'scripted' ended epoch 0 without ctx.finish"):
            trainer.run_epoch(0.5)
    finally:
        trainer.close()


def test_a_strategy_reports_a_loss_and_the_driver_gives_up_after_the_limit(client):
    class AlwaysLost(Scripted):
        def train_epoch(self, ctx):
            self.seen.append(ctx.info)
            ctx.lost("scripted loss")

    strategy = AlwaysLost()
    trainer = _trainer(client, strategy)
    try:
        with pytest.raises(RuntimeError, match="lost workers 4 times .scripted loss"):
            trainer.run_epoch(0.5)
    finally:
        trainer.close()
    assert len(strategy.seen) == 4 and len(trainer.recoveries) == 3
    assert isinstance(WorkerLost("x", 1), Exception)
