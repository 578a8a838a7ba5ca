"""A model larger than one worker trains, scores, predicts and resumes in pipeline stages.

Four worker processes of 1.75 GiB each; a ``Sequential`` of four
``Linear(8192, 8192)`` layers: 268M parameters, 1 GiB in float32, 2 GiB with
their gradients, more than a worker may hold. With
``strategy__build="workers"`` each worker builds, initialises and trains one
layer; the client plans on ``meta`` and never holds the model.
"""

from __future__ import annotations

import threading

import numpy as np
import psutil
import pytest
from distributed import Client

from daskdist import DaskNeuralNetRegressor
from daskdist.callbacks import Checkpoint
from daskdist.clusters.embedded import embedded_cluster
from daskdist.testing import LinearStack

WIDTH, DEPTH = 8192, 4
MODEL_BYTES = DEPTH * (WIDTH * WIDTH + WIDTH) * 4  # 1 GiB


class _PeakRSS:
    """The peak resident memory of this process, sampled every 20 ms while in use."""

    def __init__(self):
        self.peak = psutil.Process().memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self):
        process = psutil.Process()
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, process.memory_info().rss)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


_samplers: dict = {}


def _start_sampling(dask_worker=None):
    _samplers["rss"] = sampler = _PeakRSS()
    sampler.__enter__()
    return sampler.peak


def _stop_sampling(dask_worker=None):
    sampler = _samplers.pop("rss")
    sampler.__exit__()
    return sampler.peak


@pytest.fixture(scope="module")
def big_client():
    cluster = embedded_cluster(n_workers=4, threads_per_worker=1, memory_limit="1.75GiB")
    client = Client(cluster, set_as_default=False)
    yield client
    client.close()
    cluster.close()


@pytest.mark.timeout(600)
def test_a_model_larger_than_a_worker_trains_scores_and_predicts_in_stages(big_client,
                                                                          tmp_path):
    rng = np.random.default_rng(0)
    X = rng.normal(size=(96, WIDTH)).astype(np.float32)
    y = (0.1 * X[:, ::-1]).astype(np.float32)
    workers = sorted(big_client.scheduler_info()["workers"])
    def net(epochs, **kwargs):
        return DaskNeuralNetRegressor(
            LinearStack, module__width=WIDTH, module__depth=DEPTH, lr=1e-3, batch_size=32,
            max_epochs=epochs, strategy="pipeline", strategy__build="workers",
            strategy__n_stages=4, strategy__n_micro_batches=1, train_split=None, verbose=0,
            random_state=0, scheduler_address=big_client.scheduler.address, **kwargs)

    idle = big_client.run(_start_sampling)
    with _PeakRSS() as client_rss:
        before = client_rss.peak
        first = net(1, callbacks=[("ck", Checkpoint(tmp_path))]).fit(X, y)
        first_prediction = first.predict(X[:8])
        first.release_stages()
        # a new fit resumes each stage from its file in the sharded checkpoint
        net = net(2).fit(X, y, resume=tmp_path)
        prediction = net.predict(X[:40])
        score = net.score(X, y)
    peaks = big_client.run(_stop_sampling)

    shards = sorted(tmp_path.glob("stage-*.safetensors"))
    assert len(shards) == 4 and all(p.stat().st_size > MODEL_BYTES / 4 for p in shards)
    assert len(net.history) == 2 and len(net.rounds_) == 3
    assert net.rounds_["epoch"].tolist() == [1, 1, 1]
    assert not np.allclose(prediction[:8], first_prediction)  # it trained on from there
    assert np.isfinite(net.history[-1, "train_loss"])
    assert prediction.shape == (40, WIDTH) and np.isfinite(prediction).all()
    assert np.isfinite(score)
    # one layer per worker; no worker was lost, restarted or paused for memory
    assert sorted(big_client.scheduler_info()["workers"]) == workers
    assert len(set(net.stages_.workers)) == 4
    assert len(net.recoveries_) == 0
    # A worker took one layer and its gradient (0.5 GiB) over what it held idle (about
    # 0.5 GiB: Python, torch, dask, pandas, scikit-learn), far from the model's 1 GiB (2 GiB
    # with gradients); and stayed under the 80% of its limit at which Dask pauses a worker.
    added = {w: (peaks[w] - idle[w]) / 2**20 for w in peaks}
    print(f"MiB added per worker: {sorted(round(a) for a in added.values())}; peak GiB: "
          f"{sorted(round(p / 2**30, 2) for p in peaks.values())}; client added "
          f"{(client_rss.peak - before) / 2**20:.0f} MiB")
    assert max(added.values()) < 0.75 * MODEL_BYTES / 2**20, added
    assert max(peaks.values()) < 0.8 * 1.75 * 2**30, {w: p / 2**30 for w, p in peaks.items()}
    # the client never held the model
    assert client_rss.peak - before < MODEL_BYTES / 4, (client_rss.peak - before) / 2**20
    net.release_stages()
