"""Replica agreement: copies of the parameters that are meant to be equal are compared once per
epoch (``daskdist.driver.agreement``), cheaply, and drift is warned about and recorded."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from daskdist import DaskNeuralNetClassifier, ReplicaDriftWarning
from daskdist.driver.agreement import DRIFT_TOLERANCE, replica_drift
from daskdist.state import TrainingState
from daskdist.testing import DriftingSGD, TinyNet, WorkerScaledNet
from daskdist.worker.fingerprint import N_PROJECTIONS, fingerprint


def _second_worker(client):
    return sorted(client.scheduler_info()["workers"])[1]


def _net(module=TinyNet, **kwargs):
    params = dict(lr=0.1, batch_size=32, verbose=0, random_state=0, train_split=None,
                  max_epochs=2)
    return DaskNeuralNetClassifier(module, **{**params, **kwargs})


def test_a_fingerprint_is_a_few_numbers_that_see_a_small_change():
    rng = np.random.default_rng(0)
    params = rng.standard_normal(3_000_000).astype(np.float32)  # more than one chunk
    state = TrainingState(params, buffers={"bn.running_mean": np.ones(4, np.float32),
                                           "bn.num_batches_tracked": np.array(3)})
    a = fingerprint(state)
    assert a.shape == (N_PROJECTIONS,) and a.dtype == np.float64
    np.testing.assert_array_equal(a, fingerprint(TrainingState(params.copy(),
                                                               buffers=dict(state.buffers))))
    nudged = params.copy()
    nudged[123_456] += 0.1  # one entry in three million, 6e-5 of the vector's norm
    b = fingerprint(TrainingState(nudged, buffers=dict(state.buffers)))
    assert DRIFT_TOLERANCE < replica_drift({0: a, 1: b}) < 1e-3
    # buffers count too
    c = fingerprint(TrainingState(params, buffers={**state.buffers,
                                                   "bn.running_mean": np.full(4, 2.0,
                                                                              np.float32)}))
    assert replica_drift({0: a, 1: c}) > DRIFT_TOLERANCE


@pytest.mark.parametrize("strategy, culprit", [("sync", "replica 1"), ("ddp", "rank 1")])
def test_replicas_that_drift_apart_are_warned_about_and_resynchronised(client, tiny_data,
                                                                      strategy, culprit):
    X, y = tiny_data
    second = _second_worker(client)
    net = _net(strategy=strategy, optimizer=DriftingSGD, optimizer__drift_worker=second,
               optimizer__drift=1e-4)
    with pytest.warns(ReplicaDriftWarning, match=f"{culprit} on {second}"):
        net.fit(X, y)
    drift = net.history[:, "replica_drift"]
    assert len(drift) == 2 and min(drift) > DRIFT_TOLERANCE
    # each epoch starts again from replica 0's state: the drift does not add up over epochs
    assert drift[1] < 1.5 * drift[0]
    rounds = net.rounds_
    last_rows = rounds.groupby("epoch").tail(1)
    np.testing.assert_allclose(last_rows["drift"], drift)
    assert rounds.drop(last_rows.index)["drift"].isna().all()


@pytest.mark.parametrize("strategy, extra", [
    ("sync", {}),
    ("ddp", {}),
    ("local_sgd", {"strategy__compression": "topk", "strategy__density": 0.1}),
    ("hierarchical", {"strategy__compression": "fp16", "n_replicas": 4,
                      "strategy__groups": [[0, 1], [2, 3]]}),
])
def test_replicas_that_compute_differently_but_agree_are_not_warned_about(client, tiny_data,
                                                                         strategy, extra):
    X, y = tiny_data
    second = _second_worker(client)
    # inputs scaled on one worker: different gradients and deltas, the same averaged update
    kwargs = dict(module__worker=second, strategy=strategy, sync_every=3, **extra)
    if strategy not in ("sync", "ddp"):  # local steps drifting on one worker: deltas are shared
        kwargs.update(optimizer=DriftingSGD, optimizer__drift_worker=second)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ReplicaDriftWarning)
        net = _net(WorkerScaledNet, **kwargs).fit(X, y)
    drift = net.history[:, "replica_drift"]
    assert len(drift) == 2 and max(drift) <= DRIFT_TOLERANCE


def test_one_shared_state_is_not_compared(client, tiny_data):
    X, y = tiny_data
    net = _net(strategy="local_sgd", sync_every=3).fit(X, y)  # one averaged state a round
    assert "replica_drift" not in net.history[-1]
    assert net.rounds_["drift"].isna().all()


def test_kept_directions_give_the_fingerprint_drawn_afresh(monkeypatch):
    from daskdist.worker import fingerprint as fp

    monkeypatch.setattr(fp, "_CHUNK", 1000)  # several chunks per part
    monkeypatch.setattr(fp, "_cached", None)
    rng = np.random.default_rng(3)
    params = rng.normal(size=2500).astype(np.float32)
    buffers = {"b": rng.normal(size=300).astype(np.float32), "n": np.array(7)}
    # by hand: one generator, drawn chunk by chunk over the parameters, then the float buffers
    draw = np.random.default_rng(fp._SEED)
    chunks = [c for part in (params, buffers["b"])
              for c in np.split(part, range(1000, len(part), 1000))]
    expected = sum(draw.standard_normal((N_PROJECTIONS, len(c))) @ c.astype(np.float64)
                   for c in chunks)
    first = fp.fingerprint_of(params, buffers)
    assert fp._cached is not None and fp._cached[0] == (2500, 300)
    np.testing.assert_array_equal(first, expected)
    np.testing.assert_array_equal(fp.fingerprint_of(params, buffers), expected)  # kept
    monkeypatch.setattr(fp, "CACHE_BYTES", 0)  # too big to keep: drawn again every time
    monkeypatch.setattr(fp, "_cached", None)
    np.testing.assert_array_equal(fp.fingerprint_of(params, buffers), expected)
    assert fp._cached is None
