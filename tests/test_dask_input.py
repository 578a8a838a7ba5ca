"""Dask inputs stay on the workers: shards are made where the chunks are."""

import dask.array as da
import numpy as np
import pytest
import torch
from distributed import get_worker

from daskdist import DaskNeuralNetClassifier
from daskdist.data.sources import ShardOptions
from daskdist.driver.trainer import Trainer
from daskdist.spec import ModelSpec
from daskdist.state import module_to_state, params_vector
from daskdist.strategies import Sync
from daskdist.testing import TinyNet, make_classification


def _only_on_workers(block):
    get_worker()  # raises ValueError anywhere but inside a worker's task
    return block


def _worker_only_array(X, chunks):
    return da.from_array(X, chunks=(chunks, -1)).map_blocks(_only_on_workers, dtype=X.dtype)


def test_fit_on_dask_never_computes_the_features_on_the_client(client):
    X, y = make_classification(600)
    with pytest.raises(ValueError):  # the guard works: computing here fails
        _worker_only_array(X, 100).compute(scheduler="sync")
    Xd = _worker_only_array(X, 100)
    net = DaskNeuralNetClassifier(TinyNet, max_epochs=3, lr=0.3, batch_size=32, verbose=0,
                                  strategy="local_sgd", sync_every=2, random_state=0)
    net.fit(Xd, da.from_array(y, chunks=100))
    assert net.score(X, y) > 0.6
    assert np.isfinite(net.history[:, "valid_loss"]).all()


def test_dask_and_numpy_inputs_with_the_same_shards_train_alike(client):
    """Sequential shards of whole chunks are the numpy plan's blocks when chunks align."""
    X, y = make_classification(400)
    params = dict(max_epochs=2, lr=0.2, batch_size=32, verbose=0, strategy="sync",
                  sharding="sequential", random_state=3, train_split=None,
                  iterator_train__shuffle=True)
    from_numpy = DaskNeuralNetClassifier(TinyNet, **params).fit(X, y)
    from_dask = DaskNeuralNetClassifier(TinyNet, **params).fit(
        da.from_array(X, chunks=(100, -1)), y)
    np.testing.assert_allclose(from_dask.predict_proba(X), from_numpy.predict_proba(X),
                               atol=1e-5)


@pytest.mark.parametrize("sharding, balanced", [("stratified", True), ("sequential", False)])
def test_stratified_sharding_of_a_dask_input(client, sharding, balanced):
    # chunks of one class each, the first four of class 0: whole-chunk shards in order
    # hold one class each; stratified shards hold two chunks of each class
    X, _ = make_classification(400)
    y = np.repeat([0, 0, 0, 0, 1, 1, 1, 1], 50)
    Xd, yd = da.from_array(X, chunks=(50, 5)), da.from_array(y, chunks=50)
    spec = ModelSpec(TinyNet(n_outputs=2), criterion=torch.nn.NLLLoss(), classifier=True)
    trainer = Trainer(client, spec, Sync(), batch_size=32, n_replicas=2, random_state=0,
                      data=ShardOptions(sharding=sharding, convert={"classes": np.array([0, 1])}))
    try:
        trainer.start(Xd, yd, module_to_state(*spec.build()))
        counts = [np.bincount(shard.y, minlength=2).tolist()
                  for shard in client.gather(trainer.shards)]
    finally:
        trainer.close()
    assert counts == ([[100, 100], [100, 100]] if balanced else [[200, 0], [0, 200]])
    # the estimator passes the plan on: its shards took the same chunks
    before = _take_keys(client)
    net = DaskNeuralNetClassifier(TinyNet, max_epochs=1, batch_size=32, verbose=0,
                                  sharding=sharding, random_state=0, train_split=None)
    net.fit(Xd, yd)
    taken = _take_keys(client) - before
    chunk_classes = [sorted(c // 4 for _, shard, c in taken if shard == s) for s in (0, 1)]
    assert chunk_classes == ([[0, 0, 1, 1]] * 2 if balanced else [[0] * 4, [1] * 4])


def _take_keys(client) -> set:
    """``(name, shard, chunk)`` keys of the chunk-taking tasks the scheduler has seen."""
    def keys(dask_scheduler):
        return [list(entry[0]) for entry in dask_scheduler.transition_log
                if isinstance(entry[0], tuple) and str(entry[0][0]).startswith("daskdist-take-")]
    return {tuple(k) for k in client.run_on_scheduler(keys)}


def test_shards_are_tasks_named_after_what_they_do(client):
    X, y = make_classification(300)
    net = DaskNeuralNetClassifier(TinyNet, max_epochs=1, batch_size=32, verbose=0,
                                  strategy="local_sgd", random_state=0)
    net.fit(da.from_array(X, chunks=(100, -1)), y)

    def prefixes(dask_scheduler):
        return sorted({ts.prefix.name for ts in dask_scheduler.tasks.values()} |
                      set(dask_scheduler.task_prefixes))

    seen = client.run_on_scheduler(prefixes)
    for name in ("daskdist-take", "daskdist-shard", "daskdist-round", "daskdist-average",
                 "daskdist-valid"):
        assert name in seen, (name, seen)


def _transfers(client) -> dict:
    """Keys each worker fetched from another worker so far, by worker."""
    def log(dask_worker):
        return [key for entry in dask_worker.transfer_incoming_log for key in entry["keys"]]
    return client.run(log)


def _chunk_keys_moved(before: dict, after: dict, names) -> list:
    moved = []
    for worker, keys in after.items():
        new = keys[len(before.get(worker, [])):]
        moved += [k for k in new if str(k[0] if isinstance(k, tuple) else k).startswith(names)]
    return moved


def test_shards_are_whole_chunks_read_and_trained_on_their_workers(client, tmp_path):
    """No chunk or shard travels between workers: each worker reads its own from the store."""
    X, y = make_classification(1200)
    da.from_array(X, chunks=(100, -1)).to_zarr(str(tmp_path / "X.zarr"))
    da.from_array(y, chunks=100).to_zarr(str(tmp_path / "y.zarr"))
    Xd = da.from_zarr(str(tmp_path / "X.zarr"))
    yd = da.from_zarr(str(tmp_path / "y.zarr"))
    before = _transfers(client)
    net = DaskNeuralNetClassifier(TinyNet, max_epochs=3, lr=0.3, batch_size=32, verbose=0,
                                  strategy="local_sgd", sync_every=4, random_state=0,
                                  sharding="random", iterator_train__shuffle=True)
    net.fit(Xd, yd)
    after = _transfers(client)
    names = (Xd.name, yd.name, "daskdist-take", "daskdist-shard")
    assert _chunk_keys_moved(before, after, names) == []
    assert net.score(X, y) > 0.6


def test_a_persisted_input_trains_where_its_chunks_are_held(client):
    X, y = make_classification(1200)
    Xd, yd = client.persist([da.from_array(X, chunks=(100, -1)), da.from_array(y, chunks=100)])
    net = DaskNeuralNetClassifier(TinyNet, max_epochs=2, lr=0.3, batch_size=32, verbose=0,
                                  strategy="local_sgd", sync_every=4, random_state=0)
    net.fit(Xd, yd)
    assert net.score(X, y) > 0.6


def test_too_few_or_uneven_chunks_are_rechunked_with_a_log_line(client, caplog):
    X, y = make_classification(300)
    net = DaskNeuralNetClassifier(TinyNet, max_epochs=1, batch_size=32, verbose=0,
                                  random_state=0, train_split=None)
    with caplog.at_level("INFO", logger="daskdist.data.sources"):
        net.fit(da.from_array(X, chunks=(300, -1)), y)  # one chunk, two replicas
    assert "rechunking the input along the samples from 1 chunks" in caplog.text
    caplog.clear()
    with caplog.at_level("INFO", logger="daskdist.data.sources"):
        net.fit(da.from_array(X, chunks=((20, 260, 20), (X.shape[1],))), y)
    assert "rechunking the input" in caplog.text
    caplog.clear()
    with caplog.at_level("INFO", logger="daskdist.data.sources"):
        net.fit(da.from_array(X, chunks=(50, -1)), y)  # six even chunks, 3 a shard: left alone
    assert "rechunking" not in caplog.text
    with caplog.at_level("INFO", logger="daskdist.data.sources"):
        net.fit(da.from_array(X, chunks=(60, -1)), y)  # five: shards of 3 and 2 chunks
    assert "rechunking the input along the samples from 5 chunks" in caplog.text
    caplog.clear()
    with caplog.at_level("INFO", logger="daskdist.data.sources"):
        net.fit(da.from_array(X, chunks=(30, -1)), y)  # ten: 5 and 5
    assert "rechunking" not in caplog.text


class _Bag(torch.nn.Module):
    """Token ids in, class probabilities out: a module that starts with an embedding."""

    def __init__(self, vocabulary=6, n_outputs=2):
        super().__init__()
        self.embed = torch.nn.EmbeddingBag(vocabulary, 8)
        self.head = torch.nn.Linear(8, n_outputs)

    def forward(self, X):
        return torch.softmax(self.head(self.embed(X)), dim=-1)


def _integer_inputs(kind, X, y):
    import dask.dataframe as dd
    import pandas as pd

    if kind == "numpy":
        return X, y
    if kind == "dask":
        return da.from_array(X, chunks=(100, -1)), da.from_array(y, chunks=100)
    frame = pd.DataFrame({f"f{i}": X[:, i] for i in range(X.shape[1])})
    if X.dtype != bool:  # a bool column beside the integer ones
        frame["f0"] = frame["f0"] > 2
        X = frame.to_numpy().astype(np.int64)
    if kind == "pandas":
        return frame, y
    return dd.from_pandas(frame, npartitions=4), dd.from_pandas(pd.Series(y), npartitions=4)


@pytest.mark.parametrize("dtype", ["int64", "int8", "bool"])
@pytest.mark.parametrize("kind", ["numpy", "dask", "pandas", "dask-dataframe"])
def test_integer_and_boolean_features_train_and_predict_as_their_float32_values(client, kind,
                                                                                dtype):
    X, y = make_classification(400, n_features=5)
    X = (X > 0) if dtype == "bool" else np.round(X * 2).astype(dtype)
    Xin, yin = _integer_inputs(kind, X, y)
    if kind in ("pandas", "dask-dataframe") and dtype != "bool":
        X = _integer_inputs("pandas", X, y)[0].to_numpy().astype(np.int64)
    params = dict(max_epochs=2, lr=0.2, batch_size=32, verbose=0, strategy="sync",
                  sharding="sequential", random_state=3, train_split=None,
                  module__n_features=5)
    net = DaskNeuralNetClassifier(TinyNet, **params).fit(Xin, yin)
    # the same values as float32, in numpy, make the same shards and the same model
    reference = DaskNeuralNetClassifier(TinyNet, **params).fit(X.astype(np.float32), y)
    np.testing.assert_array_equal(params_vector(net.module_), params_vector(reference.module_))
    proba = net.predict_proba(Xin)
    proba = np.asarray(proba.compute() if hasattr(proba, "compute") else proba)
    np.testing.assert_array_equal(proba, reference.predict_proba(X.astype(np.float32)))


@pytest.mark.parametrize("kind", ["numpy", "dask"])
def test_integer_features_reach_a_module_that_starts_with_an_embedding_as_indices(client,
                                                                                  kind):
    rng = np.random.default_rng(0)
    X = rng.integers(0, 6, size=(300, 4))
    y = (X == 5).any(axis=1).astype(np.int64)  # is token 5 in the bag?
    Xin, yin = _integer_inputs(kind, X, y)
    net = DaskNeuralNetClassifier(_Bag, max_epochs=8, lr=0.5, batch_size=32, verbose=0,
                                  random_state=0, train_split=None).fit(Xin, yin)
    assert net.score(X, y) > 0.9
    proba = net.predict_proba(Xin)
    proba = np.asarray(proba.compute() if hasattr(proba, "compute") else proba)
    np.testing.assert_array_equal(proba, net.predict_proba(X))
