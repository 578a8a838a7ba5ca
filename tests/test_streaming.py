"""Streaming shards: chunk-by-chunk reading, buffer shuffles, memory held, and equal results."""

import logging

import dask
import dask.array as da
import numpy as np
import pytest
import xarray as xr
from distributed import Client

from daskdist import DaskNeuralNetClassifier, DaskNeuralNetRegressor
from daskdist.data.streaming import _stream, chunk_readers, drop_streams, make_stream_shard
from daskdist.datasets import write_zarr
from daskdist.models import MLP
from daskdist.testing import TinyNet, make_classification
from daskdist.worker.replica import RoundPlan

CHUNKS = (50, 70, 30, 60, 40, 50)  # uneven, as stores often are


def _rows(n):
    """Features whose first column is the row's index, and labels of three classes."""
    X = np.random.default_rng(0).normal(size=(n, 3)).astype(np.float32)
    X[:, 0] = np.arange(n)
    return X, np.arange(n) % 3


def _stream_shard(*, buffer_chunks=3, holdout=None, stratify=False, chunks=CHUNKS):
    X, y = _rows(sum(chunks))
    Xd, yd = da.from_array(X, chunks=(chunks, -1)), da.from_array(y, chunks=(chunks,))
    (reader,) = chunk_readers(Xd, yd, [np.arange(len(chunks))])
    return make_stream_shard(reader, replica=0, buffer_chunks=buffer_chunks, holdout=holdout,
                             stratify=stratify, seed=1, x_dtype=np.float32)


def _epoch(shard, epoch, *, batch=32, shuffle=True, run="test", seed=7):
    """The row indices of every batch of one epoch, one round per step."""
    steps = -(-len(shard) // batch)
    out = []
    for step in range(steps):
        plan = RoundPlan(run, 0, epoch, step, step, 1, batch, 0.1, seed, shuffle)
        for X, y in shard.batches(plan):
            assert np.array_equal(y.numpy(), X[:, 0].numpy().astype(np.int64) % 3)
            out.append(X[:, 0].numpy().astype(np.int64))
    drop_streams(run)
    return out


@pytest.mark.parametrize("buffer_chunks", [1, 3, 10])
def test_each_epoch_trains_every_row_once_in_a_new_order(buffer_chunks):
    shard = _stream_shard(buffer_chunks=buffer_chunks)
    first, second = np.concatenate(_epoch(shard, 0)), np.concatenate(_epoch(shard, 1))
    for order in (first, second):
        assert np.array_equal(np.sort(order), np.arange(sum(CHUNKS)))
    assert not np.array_equal(first, second)
    # The order is a function of seed, epoch and replica: a rebuilt stream repeats it.
    assert np.array_equal(np.concatenate(_epoch(shard, 1)), second)


@pytest.mark.parametrize("buffer_chunks", [1, 3])
def test_batches_mix_rows_from_a_buffer_of_chunks(buffer_chunks):
    chunk_of = np.repeat(np.arange(len(CHUNKS)), CHUNKS)
    batches = _epoch(_stream_shard(buffer_chunks=buffer_chunks), 0, batch=8)
    mixes = [len(np.unique(chunk_of[rows])) for rows in batches]
    assert np.median(mixes) == buffer_chunks  # rows of that many chunks shuffled together
    assert max(mixes) == buffer_chunks + 1  # (a batch that crosses into the next chunk)


def test_without_shuffle_rows_come_in_stored_order():
    shard = _stream_shard(buffer_chunks=3)
    order = np.concatenate(_epoch(shard, 0, shuffle=False))
    assert np.array_equal(order, np.arange(sum(CHUNKS)))


def test_a_replica_holds_its_buffer_and_one_chunk_more_and_reads_each_chunk_once_an_epoch():
    shard = _stream_shard(buffer_chunks=3)
    reads, held = [], []
    load = shard.load

    def counting_load(slot):
        reads.append(slot)
        return load(slot)

    shard.load = counting_load
    batch, run = 16, "memory"
    for epoch in range(2):
        for step in range(-(-len(shard) // batch)):
            plan = RoundPlan(run, 0, epoch, step, step, 1, batch, 0.1, 3, True)
            list(shard.batches(plan))
            stream = _stream(run, shard)
            held.append(len(stream.loaded) + len(stream.pending))
    drop_streams(run)
    assert max(held) <= 3 + 2  # the buffer, the chunk a batch crosses into, the next one
    assert len(reads) <= 2 * len(CHUNKS) + 1  # (+ the next epoch's first chunk, read ahead)
    assert sorted(set(reads)) == list(range(len(CHUNKS)))


def test_held_out_rows_are_kept_in_memory_and_never_trained_on():
    shard = _stream_shard(holdout=0.2, stratify=True)
    trained = np.concatenate(_epoch(shard, 0))
    held_out = shard.X_valid[:, 0].astype(np.int64)
    assert len(np.intersect1d(trained, held_out)) == 0
    assert np.array_equal(np.sort(np.concatenate([trained, held_out])),
                          np.arange(sum(CHUNKS)))
    assert len(shard) == len(trained)
    counts = np.bincount(shard.y_valid, minlength=3)
    assert counts.max() - counts.min() <= len(CHUNKS)  # stratified within each chunk


def test_streaming_equals_persisted_shards_when_the_order_is_the_same(client, tmp_path):
    """Unshuffled, without a hold-out, both read the same rows in the same order."""
    X, y = make_classification(600)
    path = tmp_path / "train.zarr"
    write_zarr(xr.Dataset({"x": (("sample", "feature"), X), "y": (("sample",), y)}).chunk(
        {"sample": 75}), path)
    params = dict(max_epochs=2, lr=0.2, batch_size=32, verbose=0, strategy="local_sgd",
                  sync_every=4, random_state=3, train_split=None)
    ds = xr.open_zarr(path)
    streamed = DaskNeuralNetClassifier(TinyNet, streaming=True, **params).fit(ds.x, ds.y)
    persisted = DaskNeuralNetClassifier(TinyNet, streaming=False, **params).fit(ds.x, ds.y)
    np.testing.assert_array_equal(streamed.predict_proba(X), persisted.predict_proba(X))
    assert streamed.rounds_["loss"].tolist() == persisted.rounds_["loss"].tolist()


def test_auto_streams_when_shards_would_not_fit_and_says_so(client, caplog):
    X, y = make_classification(800, n_features=8)
    Xd = da.from_array(X, chunks=(100, -1))
    net = DaskNeuralNetClassifier(
        MLP, module__hidden=(16,), max_epochs=3, lr=0.1, batch_size=32, verbose=0,
        random_state=0, iterator_train__shuffle=True, buffer_chunks=2)
    with dask.config.set({"daskdist.shards.stream-above": 1e-9}), \
            caplog.at_level(logging.INFO, logger="daskdist"):
        net.fit(Xd, y)
    assert "streaming the shards from their chunks" in caplog.text
    assert "streamed with a buffer of 2 chunks" in caplog.text
    assert net.history[-1, "valid_acc"] > 0.6
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="daskdist"):
        net.fit(Xd, y)  # the cluster's workers have gigabytes: shards are kept in memory
    assert "stream" not in caplog.text


def test_streamed_chunks_are_read_on_their_workers_and_never_moved(client, tmp_path):
    X, y = make_classification(800, n_features=8)
    path = tmp_path / "data.zarr"
    da.from_array(X, chunks=(100, -1)).to_zarr(str(path))
    Xd = da.from_zarr(str(path))
    client.run(lambda dask_worker: dask_worker.transfer_incoming_log.clear())
    net = DaskNeuralNetRegressor(
        MLP, module__output="linear", max_epochs=2, lr=0.05, batch_size=32, verbose=0,
        streaming=True, iterator_train__shuffle=True, random_state=0)
    net.fit(Xd, y.astype(np.float32))
    moved = client.run(lambda dask_worker: [
        k for t in dask_worker.transfer_incoming_log for k in t["keys"]])
    names = [k[0] if isinstance(k, tuple) else k for keys in moved.values() for k in keys]
    assert not [n for n in names if n == Xd.name or n.startswith("daskdist-take")]


def test_streaming_refuses_inputs_it_cannot_read_chunk_by_chunk(client):
    X, y = make_classification(200)
    net = DaskNeuralNetClassifier(TinyNet, max_epochs=1, verbose=0, streaming=True,
                                  train_split=None)
    with pytest.raises(ValueError, match="already in memory"):
        net.fit(X, y)
    persisted = client.persist(da.from_array(X, chunks=(50, -1)))
    with pytest.raises(ValueError, match="persisted"):
        net.fit(persisted, y)
    for bad in ({"streaming": "yes"}, {"buffer_chunks": 0}, {"buffer_chunks": 2.5}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            net.set_params(**{"streaming": True, "buffer_chunks": 4, **bad}).fit(X, y)


def _peak_rss():
    """This process's peak resident memory, in bytes (run on the workers).

    ``VmHWM``, the peak of the process's own memory: ``ru_maxrss`` also
    counts what the parent held when it spawned the process (Linux keeps the
    forked image's peak across ``exec``), and a worker is spawned from the
    test process, which holds far more than 1 GiB late in the suite.
    """
    import resource

    try:
        with open("/proc/self/status") as status:
            line = next(line for line in status if line.startswith("VmHWM:"))
        return int(line.split()[1]) * 1024
    except (OSError, StopIteration):  # not Linux
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class _RSSWatch:
    """The highest resident memory of this process while the block runs (sampled)."""

    def __enter__(self):
        import threading

        import psutil

        self._proc, self.peak, self._stop = psutil.Process(), 0, threading.Event()
        self.start = self._proc.memory_info().rss
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, self._proc.memory_info().rss)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._proc.memory_info().rss)


def test_a_store_larger_than_worker_memory_trains_within_it(client, tmp_path, caplog):
    """A 2.2 GB Zarr store on workers of 1 GiB each: shards are streamed on their own."""
    from daskdist.clusters.embedded import embedded_cluster

    n_features, chunk = 512, 8192
    n = 136 * chunk  # 2.28 GB of float32 features (+ 4.5 MB of targets), 16.8 MB chunks
    X = da.random.default_rng(0).standard_normal((n, n_features), chunks=(chunk, -1),
                                                   dtype=np.float32)
    y = X[:, :8].sum(axis=1)
    path = tmp_path / "big.zarr"
    with client.as_current():  # written by the session's workers
        write_zarr(xr.Dataset({"x": (("sample", "feature"), X), "y": (("sample",), y)}), path)
    store_bytes = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    assert store_bytes > 2e9  # (random floats do not compress)

    limit = 2**30
    with embedded_cluster(n_workers=2, memory_limit=limit) as cluster, \
            Client(cluster) as small, small.as_current():
        ds = xr.open_zarr(path)
        net = DaskNeuralNetRegressor(
            MLP, module__hidden=(), module__output="linear", max_epochs=1, lr=0.01,
            batch_size=4096, strategy="local_sgd", sync_every=16, train_split=None,
            iterator_train__shuffle=True, buffer_chunks=2, random_state=0, verbose=0)
        # A first fit in a process loads code and warms allocators (about 90 MB
        # here, whatever the data): count only what the big fit adds.
        net.fit(ds.x[:4 * chunk], ds.y[:4 * chunk])
        with _RSSWatch() as client_rss, caplog.at_level(logging.INFO, logger="daskdist"):
            net.fit(ds.x, ds.y)
        worker_peaks = small.run(_peak_rss)
    assert "streamed with a buffer of 2 chunks" in caplog.text
    assert net.history[-1, "train_loss"] < 1.0  # learnt the sum (variance 8)
    assert client_rss.peak - client_rss.start < 100e6
    assert max(worker_peaks.values()) < limit
