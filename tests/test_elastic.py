"""Elastic fits: replicas follow workers that join and leave, between rounds or epochs.

The plans themselves (:mod:`daskdist.data.replan`) are checked as pure
functions; the fits run on a process cluster of their own that the tests
scale up, retire workers from and kill workers of.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from distributed import Client
from skorch.callbacks import Callback

from daskdist import DaskNeuralNetClassifier
from daskdist.clusters.embedded import embedded_cluster
from daskdist.data import replan
from daskdist.driver.membership import plan_placement
from daskdist.state import params_vector
from daskdist.testing import KillWorkerOnTask, PacedNet, TinyNet


# -- plans --------------------------------------------------------------------------------------
@pytest.mark.parametrize("weights", [[1, 1, 1], [3, 1], [1], [2, 5, 1, 1]])
def test_shares_split_the_rows_in_proportion(weights):
    out = replan.shares(1001, weights)
    assert sum(out) == 1001
    exact = 1001 * np.array(weights) / sum(weights)
    assert np.all(np.abs(np.array(out) - exact) < 1)


def test_shares_refuse_weights_that_are_not_positive():
    with pytest.raises(ValueError, match="weights must be positive"):
        replan.shares(10, [1, 0])


@pytest.mark.parametrize("sizes, keep, n", [
    ([450, 450, 447], [0, 1, 2, None], 4),      # a replica joins
    ([300, 300], [0, 1, None, None], 4),        # two join
    ([450, 450, 447], [0, 2], 2),               # replica 1 leaves
    ([10, 500, 20], [0, 1, 2], 3),              # uneven shards evened out
    ([100, 100, 100, 100], [3], 1),             # all but one leave
])
def test_replan_moves_only_the_rows_that_must_move(sizes, keep, n):
    targets = replan.shares(sum(sizes), [1] * n)
    plan = replan.replan(sizes, keep, targets)
    # every old row goes exactly once somewhere
    taken = {old: np.zeros(size, int) for old, size in enumerate(sizes)}
    for ranges in plan:
        for old, start, stop in ranges:
            taken[old][start:stop] += 1
    assert all((t == 1).all() for t in taken.values())
    assert [sum(b - a for _, a, b in ranges) for ranges in plan] == targets
    # a staying shard keeps its own rows first, as many as its new share allows
    moved = 0
    for new, ranges in enumerate(plan):
        old = keep[new]
        stay = 0 if old is None else min(sizes[old], targets[new])
        if stay:
            assert ranges[0] == (old, 0, stay)
        moved += targets[new] - stay
    lower_bound = sum(max(size - (targets[keep.index(old)] if old in keep else 0), 0)
                      for old, size in enumerate(sizes))
    assert moved == lower_bound


def test_recipes_compose_over_the_base_shards():
    rng = np.random.default_rng(0)
    base = [rng.random((n, 2)) for n in (7, 9, 8)]
    recipes = replan.base_recipes([len(b) for b in base])
    rows = list(base)
    for keep, n in (([0, 1, 2, None], 4), ([1, 3, None], 3), ([2, 0], 2)):
        sizes = [len(r) for r in rows]
        plan = replan.replan(sizes, keep, replan.shares(sum(sizes), [1] * n))
        recipes = replan.compose(recipes, plan, keep)
        rows = [np.concatenate([rows[o][a:b] for o, a, b in ranges]) for ranges in plan]
        for recipe, expected in zip(recipes, rows):
            rebuilt = np.concatenate([base[b][positions] for b, positions in recipe.parts])
            np.testing.assert_array_equal(rebuilt, expected)
    # every base's hold-out is held by exactly one shard
    assert sorted(b for r in recipes for b in r.valid) == [0, 1, 2]


def test_remainders_hold_every_row_the_epoch_has_not_visited_once():
    """Two changes in one epoch: visited rows and the remainders partition the rows."""
    from daskdist.plan import shard_order

    sizes, batch = [450, 450, 447], [11, 11, 10]
    ids = np.arange(sum(sizes))
    rows = np.split(ids, np.cumsum(sizes)[:-1])  # global row ids of each shard
    visited = np.concatenate([rows[o][shard_order(size, 0, 2, o, True)[:3 * batch[o]]]
                              for o, size in enumerate(sizes)])
    previous = None
    for keep, n, step in (([0, 1, 2, None], 4, 3), ([1, 3, 0], 3, 7)):
        plan = replan.replan(sizes, keep, replan.shares(sum(sizes), [1] * n))
        rests = replan.remainders(sizes, batch, previous, plan, epoch=2, step=step,
                                  random_state=0, shuffle=True)
        if previous is not None:  # what the replicas visited since the first change
            visited = np.concatenate([visited] + [
                rows[o][previous[o].positions[:(step - previous[o].first_step) * batch[o]]]
                for o in range(len(sizes))])
        rows = [np.concatenate([rows[o][a:b] for o, a, b in ranges]) for ranges in plan]
        left = np.concatenate([rows[j][r.positions] for j, r in enumerate(rests)])
        assert all(r.epoch == 2 and r.first_step == step for r in rests)
        np.testing.assert_array_equal(np.sort(np.concatenate([visited, left])), ids)
        sizes = [len(r) for r in rows]
        batch = [30 // n + (1 if i < 30 % n else 0) for i in range(n)]
        previous = rests


@pytest.mark.parametrize("current, live, n, keep, workers", [
    (["a", "b"], ["a", "b", "c"], 3, [0, 1, None], ["a", "b", "c"]),
    (["a", "b", "a"], ["a", "b", "c"], 3, [0, 1, 2], ["a", "b", "c"]),  # a doubled replica moves
    (["a", "b", "c"], ["a", "c"], 2, [0, 2], ["a", "c"]),  # b left: its replica merges
    (["a", "b", "a"], ["a", "b"], 2, [0, 1], ["a", "b"]),  # the doubled one merges
    (["a", "b"], ["a", "b"], 2, [0, 1], ["a", "b"]),
    (["a", "b", "a", "b"], ["a", "b"], 4, [0, 1, 2, 3], ["a", "b", "a", "b"]),
])
def test_plan_placement(current, live, n, keep, workers):
    assert plan_placement(current, live, n) == (keep, workers)


# -- fits ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def elastic_cluster():
    cluster = embedded_cluster(n_workers=2)
    client = Client(cluster, set_as_default=False)
    yield cluster, client
    client.close()
    cluster.close()


@pytest.fixture
def three_workers():
    """A cluster of its own, whose workers the test retires (the spec cluster would not know)."""
    cluster = embedded_cluster(n_workers=3)
    client = Client(cluster, set_as_default=False)
    yield client
    client.close()
    cluster.close()


@pytest.fixture
def two_workers(elastic_cluster):
    cluster, client = elastic_cluster
    cluster.scale(2)
    _wait_for_exactly(client, 2)
    return cluster, client


class AtEpochEnd(Callback):
    """Run ``action()`` when epoch ``epoch`` ends."""

    def __init__(self, action, epoch=1):
        self.action, self.epoch = action, epoch

    def on_epoch_end(self, net, **kwargs):
        if len(net.history) == self.epoch:
            self.action()


def _scale_to(cluster, client, n):
    def action():
        cluster.scale(n)
        _wait_for_exactly(client, n)
    return action


def _wait_for_exactly(client, n, timeout=60.0):
    end = time.monotonic() + timeout
    while len(client.scheduler_info(n_workers=-1)["workers"]) != n:
        assert time.monotonic() < end, f"the cluster did not reach {n} workers"
        time.sleep(0.1)


def _net(client, module=TinyNet, **kwargs):
    params = dict(module__n_features=64, module__hidden=32, module__n_outputs=10,
                  max_epochs=4, batch_size=96, lr=0.2, strategy="local_sgd", sync_every=2,
                  train_split=None, verbose=0, random_state=0,
                  scheduler_address=client.scheduler.address)
    return DaskNeuralNetClassifier(module, **{**params, **kwargs})


@pytest.mark.timeout(240)
def test_a_worker_that_joins_after_the_first_epoch_gets_a_replica(two_workers, digits):
    cluster, client = two_workers
    X, y = digits
    net = _net(client, callbacks=[AtEpochEnd(_scale_to(cluster, client, 3))]).fit(X, y)
    rounds = net.rounds_
    assert rounds.groupby("epoch")["n_replicas"].first().tolist() == [2, 3, 3, 3]
    assert set(rounds.loc[rounds["epoch"] >= 1, "replicas"]) >= {(0, 1, 2)}
    first = rounds.loc[rounds["epoch"] == 1].iloc[0]
    assert first["membership"].startswith("2→3 replicas; joined tcp://")
    assert (rounds["membership"] != "").sum() == 1
    assert net.rounds_["round"].tolist() == list(range(len(rounds)))  # nothing run again
    assert len(net.recoveries_) == 0
    assert net.history[:, "replicas"] == [2, 3, 3, 3]
    # as good as a fit on three workers from the start
    three = _net(client).fit(X, y)
    assert three.rounds_["n_replicas"].eq(3).all()
    assert abs(net.score(X, y) - three.score(X, y)) <= 0.03
    assert net.score(X, y) > 0.9


@pytest.mark.timeout(240)
@pytest.mark.parametrize("strategy", ["async", "ddp"])
def test_strategies_without_shared_rounds_take_a_join_at_the_epoch_boundary(
        two_workers, digits, strategy):
    cluster, client = two_workers
    X, y = digits
    net = _net(client, strategy=strategy, max_epochs=3,
               callbacks=[AtEpochEnd(_scale_to(cluster, client, 3))]).fit(X, y)
    assert net.history[:, "replicas"] == [2, 3, 3]
    assert len(net.recoveries_) == 0
    rounds = net.rounds_
    assert rounds.loc[rounds["epoch"] == 2, "n_replicas"].eq(3).all()
    if strategy == "async":  # every replica's updates are applied from the join on
        assert set(rounds.loc[rounds["epoch"] >= 1, "replicas"]) == {(0,), (1,), (2,)}
    assert net.score(X, y) > 0.85


@pytest.mark.timeout(240)
def test_a_worker_retired_between_epochs_loses_no_round(three_workers, digits):
    client = three_workers
    X, y = digits
    victim = sorted(client.scheduler_info(n_workers=-1)["workers"])[-1]

    def retire():  # as adaptive scale-down, or a preemption notice, does
        client.retire_workers([victim])
        _wait_for_exactly(client, 2)

    net = _net(client, callbacks=[AtEpochEnd(retire)]).fit(X, y)
    rounds = net.rounds_
    assert rounds.groupby("epoch")["n_replicas"].first().tolist() == [3, 2, 2, 2]
    assert f"left {victim}" in rounds.loc[rounds["epoch"] == 1, "membership"].iloc[0]
    assert rounds["round"].tolist() == list(range(len(rounds)))
    assert len(net.recoveries_) == 0
    assert net.score(X, y) > 0.9


@pytest.mark.timeout(240)
def test_a_worker_retired_in_the_middle_of_an_epoch_loses_no_round(three_workers, digits):
    client = three_workers
    X, y = digits
    before = set(client.scheduler_info(n_workers=-1)["workers"])
    timers = []

    class RetireDuringEpoch2(Callback):
        def on_epoch_begin(self, net, **kwargs):
            if len(net.history) == 2:  # epoch 2 has begun: retire while its rounds run
                timers.append(threading.Timer(0.3, client.retire_workers, [[max(before)]]))
                timers[0].start()

    # paced: an epoch of 1797 samples over 3 replicas takes about 1.2 s
    net = _net(client, module=PacedNet, module__sample_time=0.002,
               callbacks=[RetireDuringEpoch2()]).fit(X, y)
    timers[0].join()
    _wait_for_exactly(client, 2)
    left = before - set(client.scheduler_info(n_workers=-1)["workers"])
    assert len(left) == 1
    rounds = net.rounds_
    assert rounds["round"].tolist() == list(range(len(rounds)))
    assert len(net.recoveries_) == 0
    # the departing replica was merged at a round boundary of the same epoch
    changed = rounds[rounds["membership"] != ""]
    assert changed["epoch"].tolist() == [1]
    assert changed["membership"].iloc[0] == f"3→2 replicas; left {left.pop()}"
    epoch = rounds[rounds["epoch"] == 1]
    assert epoch["n_replicas"].iloc[0] == 3 and epoch["n_replicas"].iloc[-1] == 2
    assert rounds.groupby("epoch")["n_replicas"].last().tolist() == [3, 2, 2, 2]
    # the epoch still trained on every training row once
    assert rounds.groupby("epoch")["samples"].sum().nunique() == 1


@pytest.mark.timeout(240)
def test_an_adaptive_cluster_whose_minimum_is_raised_gets_replicas(two_workers, digits):
    """Adaptive scaling alone does not grow a cluster for pinned rounds: raise its minimum."""
    cluster, client = two_workers
    X, y = digits
    adaptive = cluster.adapt(minimum=2, maximum=3, interval="100ms")

    def raise_minimum():
        cluster.adapt(minimum=3, maximum=3, interval="100ms")
        client.wait_for_workers(3, timeout=60)

    try:
        net = _net(client, callbacks=[AtEpochEnd(raise_minimum)]).fit(X, y)
    finally:
        adaptive.stop()
        cluster._adaptive = None
    assert net.history[:, "replicas"] == [2, 3, 3, 3]
    assert len(net.recoveries_) == 0


@pytest.mark.timeout(240)
def test_with_n_replicas_given_joining_workers_only_spread_them(two_workers, digits):
    cluster, client = two_workers
    X, y = digits
    net = _net(client, n_replicas=3, callbacks=[AtEpochEnd(_scale_to(cluster, client, 3))])
    net.fit(X, y)
    rounds = net.rounds_
    assert rounds["n_replicas"].eq(3).all()
    assert rounds.loc[rounds["epoch"] == 1, "membership"].iloc[0].startswith("3→3 replicas")
    # the same rows per replica, moved whole: the fit is the one without the join
    cluster.scale(2)
    _wait_for_exactly(client, 2)
    fixed = _net(client, n_replicas=3).fit(X, y)
    np.testing.assert_array_equal(params_vector(net.module_), params_vector(fixed.module_))


@pytest.mark.timeout(240)
def test_elastic_false_and_max_replicas_keep_the_replicas(two_workers, digits):
    cluster, client = two_workers
    X, y = digits
    net = _net(client, elastic=False, max_epochs=2,
               callbacks=[AtEpochEnd(_scale_to(cluster, client, 3))]).fit(X, y)
    assert net.rounds_["n_replicas"].eq(2).all()
    assert (net.rounds_["membership"] == "").all()
    capped = _net(client, max_replicas=2, max_epochs=2).fit(X, y)  # on 3 workers
    assert capped.rounds_["n_replicas"].eq(2).all()
    for bad in (0, 1.5, True):
        with pytest.raises(ValueError, match="max_replicas="):
            _net(client, max_replicas=bad).fit(X, y)
    with pytest.raises(ValueError, match="elastic="):
        _net(client, elastic="yes").fit(X, y)


class GrowAfterFirstEpoch(Callback):
    """Ask for a third worker when the first epoch ends, without waiting for it."""

    def __init__(self, cluster):
        self.cluster = cluster

    def on_epoch_end(self, net, **kwargs):
        if len(net.history) == 1:
            self.cluster.scale(3)


@pytest.mark.timeout(240)
@pytest.mark.parametrize("strategy, options, mid_epoch", [
    ("local_sgd", {}, True),
    ("sync", {}, True),  # (hierarchical runs the same round loop: not repeated here)
    # replicas that keep a residual of their own take changes at the epoch's end
    ("local_sgd", {"strategy__compression": "topk", "strategy__density": 0.2}, False),
])
def test_a_worker_that_joins_mid_epoch_trains_from_the_next_round(two_workers, digits,
                                                                 strategy, options, mid_epoch):
    cluster, client = two_workers
    X, y = digits
    # paced: an epoch on two replicas takes about 7 s, so the worker arrives within it
    epochs = 2 if mid_epoch else 3
    net = _net(client, module=PacedNet, module__sample_time=0.008, strategy=strategy,
               max_epochs=epochs, callbacks=[GrowAfterFirstEpoch(cluster)], **options).fit(X, y)
    rounds = net.rounds_
    changed = rounds[rounds["membership"] != ""]
    assert len(changed) == 1 and changed["membership"].iloc[0].startswith("2→3 replicas; joined")
    first_of_epoch = rounds.groupby("epoch")["round"].first()
    if mid_epoch:
        assert changed["epoch"].iloc[0] == 1
        assert changed["round"].iloc[0] > first_of_epoch[1]
        epoch = rounds[rounds["epoch"] == 1]
        assert epoch["n_replicas"].iloc[0] == 2 and epoch["n_replicas"].iloc[-1] == 3
    else:
        assert changed["round"].iloc[0] == first_of_epoch[2]
    assert rounds["round"].tolist() == list(range(len(rounds)))  # nothing run again
    assert len(net.recoveries_) == 0
    # the interrupted epoch still trained on every row once
    assert rounds.groupby("epoch")["samples"].sum().tolist() == [len(X)] * epochs
    assert net.score(X, y) > 0.85


def _log_read(block, path, block_info=None):
    """``block``, after noting which process read which chunk of the input."""
    import os

    with open(path, "a") as log:
        log.write(f"{block_info[0]['chunk-location'][0]} {os.getpid()}\n")
    return block


def _reads(client, path) -> list:
    """``(chunk, worker)`` of each chunk read on a worker (the client's reads left out)."""
    import os

    workers = {str(pid): w for w, pid in client.run(os.getpid).items()}
    log = [line.split() for line in path.read_text().splitlines()]
    assert all(pid in workers or pid == str(os.getpid()) for _, pid in log)
    return [(int(chunk), workers[pid]) for chunk, pid in log if pid in workers]


@pytest.mark.timeout(240)
def test_a_zarr_fit_that_grows_reads_each_chunk_once_on_its_own_worker(two_workers, digits,
                                                                       tmp_path):
    """The joining worker reads nothing from the store: rows move between workers once."""
    import dask.array as da

    cluster, client = two_workers
    X, y = digits
    da.from_array(X, chunks=(100, -1)).to_zarr(str(tmp_path / "X.zarr"))
    da.from_array(y, chunks=100).to_zarr(str(tmp_path / "y.zarr"))
    reads = tmp_path / "reads.txt"
    Xd = da.from_zarr(str(tmp_path / "X.zarr")).map_blocks(
        _log_read, str(reads), dtype=X.dtype, meta=np.empty((0, 64), X.dtype))
    yd = da.from_zarr(str(tmp_path / "y.zarr"))
    first = set(client.scheduler_info(n_workers=-1)["workers"])
    net = _net(client, module=PacedNet, module__sample_time=0.008, max_epochs=2,
               streaming=False, callbacks=[GrowAfterFirstEpoch(cluster)]).fit(Xd, yd)
    rounds = net.rounds_
    changed = rounds[rounds["membership"] != ""]
    assert changed["epoch"].tolist() == [1] and rounds["n_replicas"].iloc[-1] == 3
    assert len(net.recoveries_) == 0
    log = _reads(client, reads)
    chunks = [chunk for chunk, _ in log]
    assert sorted(chunks) == list(range(Xd.numblocks[0]))  # every chunk read once
    assert {worker for _, worker in log} <= first  # by the workers it was first placed on
    assert net.score(X, y) > 0.85


@pytest.mark.timeout(240)
def test_streamed_shards_follow_a_join_and_the_new_worker_reads_its_own_chunks(
        two_workers, digits, tmp_path):
    """Streamed shards move as chunk readers: the new replica reads its chunks itself."""
    import dask.array as da

    cluster, client = two_workers
    X, y = digits
    reads = tmp_path / "reads.txt"
    Xd = da.from_array(X, chunks=(100, -1)).map_blocks(
        _log_read, str(reads), dtype=X.dtype, meta=np.empty((0, 64), X.dtype))
    yd = da.from_array(y, chunks=100)
    first = set(client.scheduler_info(n_workers=-1)["workers"])

    def grow():
        from daskdist.torch_warmup import is_warm

        _scale_to(cluster, client, 3)()
        while not all(client.run(is_warm).values()):  # a cold worker's rounds may be stolen
            time.sleep(0.1)

    class ForgetReadsBeforeTheLastEpoch(Callback):
        def on_epoch_begin(self, net, **kwargs):
            if len(net.history) == 3:
                reads.write_text("")

    net = _net(client, max_epochs=3, streaming=True,
               callbacks=[AtEpochEnd(grow), ForgetReadsBeforeTheLastEpoch()]).fit(Xd, yd)
    assert net.history[:, "replicas"] == [2, 3, 3]
    assert len(net.recoveries_) == 0
    rounds = net.rounds_
    assert rounds.groupby("epoch")["samples"].sum().tolist() == [len(X)] * 3
    log = set(_reads(client, reads))  # the last epoch's
    assert {chunk for chunk, _ in log} == set(range(Xd.numblocks[0]))
    assert len({chunk for chunk, _ in log}) == len(log)  # each by one worker only
    # the joining worker read a third of the chunks itself, from the input
    new = {chunk for chunk, worker in log if worker not in first}
    assert 4 <= len(new) <= 8, sorted(new)
    assert net.score(X, y) > 0.85


def _random_data(n):
    rng = np.random.default_rng(0)
    return rng.normal(size=(n, 20)).astype(np.float32), rng.integers(0, 3, n)


def _started_trainer(client, X, y, data):
    """A local_sgd Trainer of a TinyNet, started on ``X`` and ``y``."""
    from daskdist.driver.trainer import Trainer
    from daskdist.spec import ModelSpec
    from daskdist.state import module_to_state
    from daskdist.strategies import LocalSGD

    spec = ModelSpec(TinyNet())
    module, optimizer = spec.build()
    trainer = Trainer(client, spec, LocalSGD(sync_every=2), batch_size=16, data=data)
    return trainer.start(X, y, module_to_state(module, optimizer))


@pytest.mark.timeout(120)
def test_a_streamed_shard_made_by_a_join_is_rebuilt_from_its_chunks(two_workers):
    """What recovery does when the worker of a re-planned streamed shard dies."""
    import dask.array as da

    from daskdist.data.sources import ShardOptions
    from daskdist.driver import membership, recovery
    cluster, client = two_workers
    X, y = _random_data(600)
    trainer = _started_trainer(client, da.from_array(X, chunks=(50, -1)),
                               da.from_array(y, chunks=50),
                               ShardOptions(holdout=0.2, streaming=True))
    try:
        before = client.gather(trainer.shards)
        _scale_to(cluster, client, 3)()
        assert membership.follow_workers(trainer)["after"] == 3
        made = client.gather(trainer.shards)
        assert sorted(c for s in made for c in s.reader.chunk_ids) == list(range(12))
        assert [len(s.reader) for s in made] == [4, 4, 4]
        # the hold-outs moved with their chunks: the same rows are held out
        np.testing.assert_array_equal(np.sort(np.concatenate([s.X_valid for s in made]), 0),
                                      np.sort(np.concatenate([s.X_valid for s in before]), 0))
        for i in range(3):
            rebuilt = recovery.submit_shard(trainer, i, trainer.replica_workers[(i + 1) % 3])
            again = rebuilt.result()
            assert again.reader.chunk_ids == made[i].reader.chunk_ids
            np.testing.assert_array_equal(again.X_valid, made[i].X_valid)
            for v, w in zip(again.valid_positions, made[i].valid_positions):
                np.testing.assert_array_equal(v, w)
            rebuilt.release()
    finally:
        trainer.close()


@pytest.mark.timeout(300)
def test_a_worker_killed_after_a_join_ends_where_the_undisturbed_fit_does(two_workers, digits,
                                                                         tmp_path):
    cluster, client = two_workers
    X, y = digits
    baseline = _net(client, callbacks=[AtEpochEnd(_scale_to(cluster, client, 3))]).fit(X, y)
    cluster.scale(2)
    _wait_for_exactly(client, 2)
    victim = int(baseline.rounds_.loc[baseline.rounds_["epoch"] == 2, "round"].iloc[1])
    plugin = KillWorkerOnTask(rf"^\('daskdist-round-.*', {victim}, 2\)$", tmp_path)
    client.register_plugin(plugin)
    try:
        net = _net(client, callbacks=[AtEpochEnd(_scale_to(cluster, client, 3))]).fit(X, y)
    finally:
        client.unregister_worker_plugin(plugin.name)
    assert len(plugin.kills()) == 1  # the new replica's worker died in epoch 3
    assert len(net.recoveries_) <= 1
    assert net.history[:, "replicas"] == [2, 3, 3, 3]  # a crash does not merge replicas
    np.testing.assert_array_equal(params_vector(net.module_), params_vector(baseline.module_))


@pytest.mark.timeout(120)
@pytest.mark.parametrize("holdout, step", [(None, None), (0.2, None), (0.2, 3)])
def test_a_reshaped_shard_is_rebuilt_from_the_source_row_for_row(two_workers, holdout, step):
    """What recovery does when Dask cannot recompute a shard made by a join."""
    from daskdist.data.sources import ShardOptions
    from daskdist.driver import membership, recovery
    cluster, client = two_workers
    X, y = _random_data(301)
    trainer = _started_trainer(client, X, y, ShardOptions(holdout=holdout))
    try:
        _scale_to(cluster, client, 3)()
        change = membership.follow_workers(trainer, step)
        assert change["before"] == 2 and change["after"] == 3
        assert trainer.recipes is not None and len(trainer.shards) == 3
        made = client.gather(trainer.shards)
        assert sum(len(s) for s in made) + sum(s.n_valid for s in made) == 301
        for i in range(3):
            rebuilt = recovery.submit_shard(trainer, i, trainer.replica_workers[(i + 1) % 3])
            again = rebuilt.result()
            for name in ("X", "y", "X_valid", "y_valid"):
                np.testing.assert_array_equal(getattr(again, name), getattr(made[i], name))
            if step is None:
                assert again.remainder is None and made[i].remainder is None
            else:  # mid-epoch, the rows the epoch has left come back too
                assert again.remainder.first_step == step
                np.testing.assert_array_equal(again.remainder.positions,
                                              made[i].remainder.positions)
            rebuilt.release()
    finally:
        trainer.close()
