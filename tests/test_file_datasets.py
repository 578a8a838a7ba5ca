"""Datasets read by index on the workers: files never pass through the client."""

import pickle

import numpy as np
import pytest
import torch
from distributed.diagnostics.plugin import SchedulerPlugin
from torch.utils.data import Dataset

from daskdist import DaskNeuralNetClassifier, DaskNeuralNetRegressor
from daskdist.data.dataset_shards import pack_rows, unpack_rows
from daskdist.models import MLP
from daskdist.state import params_vector
from daskdist.testing import NpyFiles, TinyNet, TinySequential, write_npy_files


class ShardTaskBytes(SchedulerPlugin):
    """Records the pickled size of every shard-building task the scheduler receives."""

    name = "shard-task-bytes"

    def __init__(self):
        self.sizes = {}

    async def start(self, scheduler):
        self.scheduler = scheduler

    def transition(self, key, start, finish, *args, **kwargs):
        if start == "released" and finish == "waiting" and "daskdist-shard" in str(key):
            spec = self.scheduler.tasks[key].run_spec
            self.sizes[str(key)] = len(pickle.dumps(spec))


class Mapped(Dataset):
    """``files``' samples, changed by ``fn(features, label)`` as they are read."""

    def __init__(self, files, fn):
        self.files, self.fn = files, fn

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        return self.fn(*self.files[i])


def _shard_bytes(dask_scheduler):
    return dict(dask_scheduler.plugins["shard-task-bytes"].sizes)


@pytest.fixture(scope="module")
def digit_files(tmp_path_factory):
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    X = (X - X.mean(0)) / (X.std(0) + 1e-6)  # float64 on disk, as a user's files might be
    return write_npy_files(tmp_path_factory.mktemp("digits"), X, y), X, y


def _classifier(**kwargs):
    options = dict(module=MLP, module__hidden=(64,), max_epochs=10, lr=0.1, batch_size=64,
                   optimizer__momentum=0.9, iterator_train__shuffle=True, random_state=0,
                   verbose=0)
    options = {**options, **kwargs}
    if options["module"] is not MLP:
        options.pop("module__hidden")
    return DaskNeuralNetClassifier(**options)


def test_pack_rows_round_trips_in_about_a_byte_a_row():
    rng = np.random.default_rng(0)
    rows = np.sort(rng.choice(60_000, 30_000, replace=False))
    packed = pack_rows(rows)
    np.testing.assert_array_equal(unpack_rows(packed), rows)
    assert len(pickle.dumps(packed)) < 1.1 * len(rows)
    for rows in (np.arange(0), np.array([7]), np.array([5, 3, 9]), np.array([0, 70_000])):
        np.testing.assert_array_equal(unpack_rows(pack_rows(rows)), rows)


def test_digits_from_npy_files_train_on_the_workers(client, digit_files):
    files, X, y = digit_files
    plugin = ShardTaskBytes()
    client.register_plugin(plugin)
    reads_here = NpyFiles.reads
    net = _classifier().fit(files, None)
    assert NpyFiles.reads == reads_here  # nothing was read on the client
    sizes = client.run_on_scheduler(_shard_bytes)
    assert len(sizes) == 2
    assert max(sizes.values()) < 4096, sizes  # indices, not samples (900 rows per shard)
    assert net.history[-1, "valid_acc"] >= 0.95
    np.testing.assert_array_equal(net.classes_, np.arange(10))
    # predict reads the dataset here, through iterator_valid, as skorch does
    predicted = net.predict(files)
    assert (predicted == y).mean() >= 0.95
    np.testing.assert_allclose(net.predict_proba(files), net.predict_proba(X.astype(np.float32)),
                               rtol=1e-6, atol=1e-7)


def test_a_dataset_trains_as_its_arrays_do(client, digit_files):
    files, X, y = digit_files
    from_files = _classifier(max_epochs=2, strategy="local_sgd", sync_every=4).fit(files, None)
    from_arrays = _classifier(max_epochs=2, strategy="local_sgd", sync_every=4).fit(X, y)
    # the same shards, hold-outs and batches: only the reading differs
    np.testing.assert_allclose(params_vector(from_files.module_),
                               params_vector(from_arrays.module_), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(from_files.history[:, "valid_loss"],
                               from_arrays.history[:, "valid_loss"], rtol=1e-5)


def test_classes_given_in_any_order_and_a_regressor(client, digit_files):
    files, X, y = digit_files
    classes = [9, 3, 0, 1, 2, 4, 5, 6, 7, 8]
    net = _classifier(max_epochs=2, classes=classes, train_split=None).fit(files, None)
    np.testing.assert_array_equal(net.classes_, classes)
    assert (net.predict(files) == y).mean() > 0.8

    def pairs(features, label):  # two targets per sample, from the same files
        return features, np.array([label, -label], dtype=np.float64)

    regressor = DaskNeuralNetRegressor(MLP, module__hidden=(32,), max_epochs=3, lr=0.01,
                                       batch_size=64, random_state=0, verbose=0)
    regressor.fit(Mapped(files, pairs), None)
    assert regressor.predict(Mapped(files, pairs)).shape == (len(y), 2)
    assert np.isfinite(regressor.history[-1, "valid_loss"])


def test_loader_processes_read_on_an_embedded_cluster(session_client, digit_files):
    files, X, y = digit_files
    # no current client: the fit starts its own cluster, whose workers may start processes
    net = _classifier(max_epochs=3, iterator_train__num_workers=2).fit(files, None)
    assert net.history[-1, "valid_acc"] > 0.9
    baseline = _classifier(max_epochs=3, scheduler_address=session_client.scheduler.address)
    baseline.fit(X, y)
    np.testing.assert_allclose(params_vector(net.module_), params_vector(baseline.module_),
                               rtol=1e-5, atol=1e-6)


class _Features(Dataset):
    def __len__(self):
        return 10

    def __getitem__(self, i):
        return np.zeros(4, dtype=np.float32)


def test_dataset_inputs_refused_with_the_reason(client, digit_files, tiny_data):
    files, _, y = digit_files
    # the session cluster's workers are daemonic: they cannot start loader processes
    with pytest.raises(ValueError, match="distributed.worker.daemon"):
        _classifier(iterator_train__num_workers=2).fit(files, None)
    with pytest.raises(ValueError, match="y is given beside"):
        _classifier().fit(files, y)
    with pytest.raises(ValueError, match=r"\(features, target\) pairs"):
        _classifier().fit(_Features(), None)
    with pytest.raises(ValueError, match="sample_weight is supported for in-memory"):
        _classifier().fit(files, None, sample_weight=np.ones(len(y)))
    with pytest.raises(ValueError, match="A preprocessor transforms arrays"):
        _classifier(preprocessor=np.tanh).fit(files, None)
    X, y = tiny_data
    with pytest.raises(ValueError, match="iterator_train__num_workers .*arrays are batched"):
        DaskNeuralNetClassifier(TinyNet, iterator_train__num_workers=2, verbose=0).fit(X, y)


def test_a_dataset_of_dicts_feeds_a_two_input_module(client, digit_files):
    files, X, y = digit_files

    def halves(features, label):
        return {"left": features[:32], "right": torch.from_numpy(features[32:])}, label

    class TwoInputs(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.left, self.right = torch.nn.Linear(32, 10), torch.nn.Linear(32, 10)

        def forward(self, left, right):
            return torch.softmax(self.left(left) + self.right(right), dim=-1)

    net = DaskNeuralNetClassifier(TwoInputs, max_epochs=4, lr=0.2, batch_size=64, verbose=0,
                                  random_state=0).fit(Mapped(files, halves), None)
    assert (net.predict(Mapped(files, halves)) == y).mean() > 0.9


@pytest.mark.parametrize("strategy", ["ddp", "pipeline", "hierarchical", "async"])
def test_every_strategy_reads_a_dataset_as_its_arrays(client, digit_files, strategy):
    files, X, y = digit_files
    options = dict(max_epochs=2, strategy=strategy, iterator_train__shuffle=False)
    if strategy == "pipeline":  # a Sequential, cut in two stages
        options.update(module=TinySequential, module__n_features=64, module__n_outputs=10,
                       strategy__n_stages=2, n_replicas=1)
    if strategy == "async":
        options["n_replicas"] = 1  # one replica: its updates apply in one order
    from_files = _classifier(**options).fit(files, None)
    from_arrays = _classifier(**options).fit(X, y)
    np.testing.assert_allclose(params_vector(from_files.module_),
                               params_vector(from_arrays.module_), rtol=1e-5, atol=1e-6)


def test_a_dataset_lost_with_its_workers_is_sent_again(client, digit_files):
    from daskdist.data.indexed import DatasetSource, survey

    files, _, y = digit_files
    data = survey(client, files, need_targets=False, loader={})
    source = DatasetSource(data)
    lost = data.future
    client.cancel(lost)  # as when every worker holding it is gone: Dask cannot recompute it
    worker = sorted(client.scheduler_info()["workers"])[0]
    shard = source.submit_shard(client, 0, np.arange(100, 150), worker, run_id="lost-dataset",
                                valid_positions=np.array([0, 1]))
    built = shard.result()
    assert data.future is not lost and data.future.status == "finished"
    assert len(built) == 48 and built.n_valid == 2
    np.testing.assert_array_equal(built.valid_rows, [100, 101])
