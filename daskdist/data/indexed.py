"""Datasets read by index: a torch ``Dataset`` whose samples are read on the workers.

A map-style dataset that reads its samples when indexed (images or audio
from files, say) is never read on the client. It travels to the cluster
once, as the object it is, and each replica gets the indices of its
samples, packed to about a byte each (:func:`~.dataset_shards.pack_rows`);
the workers read the samples through a DataLoader while they train
(:mod:`daskdist.data.dataset_shards`).

Before the fit, :func:`survey` asks the workers for what the client must
know: one sample (its shapes and dtypes, for the module's dry pass and a
regressor's target width) and, when the fit needs them, every target
(a classifier's classes unless ``classes=`` names them, stratified shards
and hold-outs), read in one pass spread over the workers (in their own
processes), or taken from the dataset's ``targets`` attribute
(torchvision's convention) without reading anything. Shards are then
planned per sample on the client, as for NumPy input.
"""

from __future__ import annotations

import logging

import numpy as np
from skorch.dataset import Dataset as SkorchDataset
from torch.utils.data import Dataset, IterableDataset, TensorDataset

from .._compat import workers as cluster_workers
from . import dataset_shards as reading
from .named import each
from .shards import feature_dtype
from .sources import Source

logger = logging.getLogger(__name__)

__all__ = ["IndexedInput", "DatasetSource", "ConvertedDataset", "reads_by_index", "survey",
           "check_loader", "check_dataset", "loader_options"]


def reads_by_index(X) -> bool:
    """Whether ``X`` is a map-style dataset read sample by sample (not an in-memory one)."""
    return (isinstance(X, Dataset) and not isinstance(X, (IterableDataset, TensorDataset,
                                                         SkorchDataset)))


class IndexedInput:
    """A dataset to read on the workers, and what the client learnt of it.

    Attributes
    ----------
    dataset : torch.utils.data.Dataset
    future : distributed.Future
        The dataset, sent to the cluster once.
    n_samples : int
    example : numpy.ndarray or dict
        The first sample's features, as a batch of one.
    y_example : numpy.ndarray
        The first sample's target.
    targets : numpy.ndarray or None
        Every target, when the fit needed them.
    loader : dict
        DataLoader options for the workers (``iterator_train__*``).
    """

    def __init__(self, dataset, future, n_samples, example, y_example, targets, loader):
        self.dataset = dataset
        self.future = future
        self.n_samples = int(n_samples)
        self.example = example
        self.y_example = y_example
        self.targets = targets
        self.loader = loader

    def __len__(self) -> int:
        return self.n_samples


def check_loader(client, loader: dict) -> None:
    """Refuse ``num_workers > 0`` on workers that cannot start processes (before any work)."""
    n = loader.get("num_workers") or 0
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise ValueError(f"iterator_train__num_workers must be a non-negative integer, got {n!r}.")
    if n and any(client.run(reading.is_daemonic).values()):
        raise ValueError(
            f"iterator_train__num_workers={n} starts DataLoader processes inside the Dask "
            "workers, and Python refuses child processes to daemonic ones: start the workers "
            "with the Dask setting distributed.worker.daemon: False (daskdist's own local "
            "cluster does), or use num_workers=0.")


def survey(client, dataset, *, need_targets: bool, loader: dict) -> IndexedInput:
    """Learn, from the workers, what a fit on ``dataset`` needs to know on the client.

    Parameters
    ----------
    client : distributed.Client
    dataset : torch.utils.data.Dataset
        Map-style, with ``__len__``; its samples are ``(features, target)``.
    need_targets : bool
        Read every target (a classifier's classes, stratified plans).
    loader : dict
        DataLoader options (:data:`~.dataset_shards.LOADER_OPTIONS`).
    """
    name = type(dataset).__name__
    try:
        n = len(dataset)
    except TypeError:
        raise ValueError(f"{name} has no __len__: daskdist needs the number of samples to "
                         "plan shards.") from None
    if n < 1:
        raise ValueError(f"{name} holds no samples; at least 1 is needed to fit.")
    check_loader(client, loader)
    future = _send(client, dataset)
    example = client.submit(reading.read_example, future, loader.get("collate_fn"), pure=False)
    targets = _known_targets(dataset, n) if need_targets else None
    parts = []
    if need_targets and targets is None:
        n_parts = min(n, 2 * max(len(cluster_workers(client)), 1))
        bounds = np.linspace(0, n, n_parts + 1).astype(int)
        parts = [client.submit(reading.read_targets, future, int(a), int(b), pure=False)
                 for a, b in zip(bounds[:-1], bounds[1:])]
    X0, y0 = example.result()
    if parts:
        targets = np.concatenate(client.gather(parts))
    return IndexedInput(dataset, future, n, X0, y0, targets, loader)


def _send(client, dataset):
    """The dataset, sent to every worker (Dask may keep fewer copies later)."""
    return client.scatter(dataset, hash=False, broadcast=True)


def _known_targets(dataset, n: int):
    """The dataset's ``targets`` attribute as an array, when it has one for every sample."""
    targets = getattr(dataset, "targets", None)
    if targets is None:
        return None
    try:
        targets = np.asarray(targets)
    except (TypeError, ValueError):
        return None
    return targets if targets.ndim >= 1 and len(targets) == n else None


class DatasetSource(Source):
    """A dataset read on the workers: shards are its indices (see the module docstring)."""

    lazy = True  # the samples are not in client memory
    resize_refusal = "its shards read a torch Dataset by index on their workers"

    def __init__(self, data: IndexedInput):
        self.X, self.y = data, None
        self.data = data

    @property
    def n_samples(self) -> int:
        return self.data.n_samples

    def labels(self):
        if self.data.targets is None:
            raise ValueError("sharding='stratified' needs every target of the dataset.")
        return self.data.targets

    def holdout_on_client(self) -> bool:
        return True

    def prepare(self, client, plan, *, run_id, workers=None):
        check_loader(client, self.data.loader)

    def _raw(self, client, index, rows, worker, valid_positions):  # pragma: no cover - unused
        raise NotImplementedError

    def submit_shard(self, client, index, rows, worker, *, run_id, valid_positions=None,
                     **shard_kwargs):
        valid = np.zeros(0, dtype=np.int64) if valid_positions is None else valid_positions
        if self.data.future.status != "finished":
            # lost with the workers that held it (Dask cannot recompute sent data): the
            # client still has the dataset object, so it is sent again, as NumPy shards are
            logger.info("the dataset was lost with a worker; sending it again")
            self.data.future = _send(client, self.data.dataset)
        return client.submit(
            reading.make_dataset_shard, self.data.future, reading.pack_rows(rows),
            reading.pack_rows(valid),
            replica=index, loader=self.data.loader, **shard_kwargs,
            key=(f"daskdist-shard-{run_id}", int(index)),
            workers=[worker], allow_other_workers=True, pure=False,
        )


def loader_options(net) -> dict:
    """The ``iterator_train__*`` options a dataset's loader takes on the workers."""
    return {k: v for k, v in net.get_params_for("iterator_train").items()
            if k in reading.LOADER_OPTIONS}


def check_dataset(net, dataset, y, classes=None) -> IndexedInput:
    """A dataset input of ``net.fit``, surveyed on the cluster (before any training).

    Sets the net's target facts (classes, output width) as array inputs do.
    """
    from ..clusters.embedded import cluster_client

    name = type(dataset).__name__
    if y is not None:
        raise ValueError(f"y is given beside the {name}, whose samples are (features, target) "
                         "pairs; pass y=None.")
    if net.preprocessor is not None:
        raise ValueError(f"A preprocessor transforms arrays; the {name} transforms its own "
                         "samples in __getitem__.")
    _, stratified = net._holdout()
    named = getattr(net, "classes", None)
    given = named if named is not None and len(named) else classes
    need = net._classifier and (net.sharding == "stratified" or stratified or given is None
                                or not len(given))
    with cluster_client(net.scheduler_address) as (client, _):
        data = survey(client, dataset, need_targets=need, loader=loader_options(net))
    if net._classifier:
        if data.targets is not None:
            net._set_target_info(data.targets, classes)
        else:  # classes= names every label; the workers encode the targets they read
            net._set_target_info(None, classes, found=np.asarray(given))
    else:
        net._set_target_info(data.y_example[None], classes)
    net.input_features_, net.target_name_ = None, None
    example = data.example
    net.n_features_in_ = (example.shape[1] if getattr(example, "ndim", 0) == 2 else None)
    return data


class ConvertedDataset(Dataset):
    """A dataset's features converted for the module, for :meth:`predict` on the client.

    Samples may be ``(features, target)`` pairs (the target is dropped) or
    features alone.
    """

    def __init__(self, dataset, *, index_features: bool = False):
        self.dataset = dataset
        self.index_features = index_features

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i):
        sample = self.dataset[i]
        X = sample[0] if isinstance(sample, (tuple, list)) and len(sample) == 2 else sample
        X = each(reading.numpy_sample(X), lambda a: np.asarray(a).astype(
            feature_dtype(a.dtype, index_features=self.index_features), copy=False))
        return X, 0
