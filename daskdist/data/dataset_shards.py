"""Shards of a ``Dataset`` read by index: the worker reads its samples while it trains.

A :class:`DatasetShard` holds the user's dataset (a small object: file names,
a folder) and the dataset indices of its replica's training and hold-out
samples, never the samples. Each round reads the batches its plan names
through a ``torch.utils.data.DataLoader`` on the worker, so a dataset's own
transforms run every epoch, as in a plain PyTorch loop. The loader takes the
user's ``iterator_train__*`` options (``num_workers``, ``collate_fn``,
``pin_memory``, ``prefetch_factor``, ``worker_init_fn``, ``timeout``,
``multiprocessing_context``); with ``num_workers > 0`` its reading processes
start once per replica and serve every round and hold-out of the fit
(persistent workers), and they stop when the fit ends. They start with the
worker process's start method (``spawn`` under Dask's nannies: a second or
more each, to import torch), unless ``multiprocessing_context`` says otherwise.

Batches are converted exactly as array shards are
(:func:`~daskdist.data.shards.convert_rows`): float features to the module's
float type, labels to their position in ``classes``. The order of the rows is
the plan's (:meth:`daskdist.plan.RoundPlan.positions`), a function of the seed,
epoch and replica only, so a round rebuilt on another worker reads the same
samples. Randomness inside the dataset (augmentation) is drawn from the
reading process's own generator and is not replayed after a worker is lost.
"""

from __future__ import annotations

import multiprocessing
import threading
from collections import OrderedDict

import numpy as np
import torch
from torch.utils.data import DataLoader
from torch.utils.data import default_collate as torch_collate

from ..worker.runtime import on_drop_run
from .named import each
from .shards import convert_rows

__all__ = ["DatasetShard", "make_dataset_shard", "pack_rows", "unpack_rows", "read_example",
           "read_targets", "is_daemonic", "numpy_sample", "drop_loaders", "LOADER_OPTIONS"]

#: ``iterator_train__*`` options a dataset's loader on the workers takes.
LOADER_OPTIONS = ("num_workers", "collate_fn", "pin_memory", "prefetch_factor",
                  "worker_init_fn", "timeout", "multiprocessing_context")


def pack_rows(rows) -> tuple:
    """Dataset indices in a few bytes per row: the first, then the gaps in the smallest dtype.

    Sorted index sets (every shard plan's) pack to about one byte per row.
    """
    rows = np.asarray(rows, dtype=np.int64)
    gaps = np.diff(rows)
    if len(rows) == 0 or (len(gaps) and gaps.min() < 0):  # as they are (signed: not gaps)
        return 0, rows.astype(np.int32 if not len(rows) or rows.max() < 2**31 else np.int64)
    for dtype in (np.uint8, np.uint16, np.uint32, np.uint64):
        if not len(gaps) or gaps.max() <= np.iinfo(dtype).max:
            return int(rows[0]), gaps.astype(dtype)


def unpack_rows(packed: tuple) -> np.ndarray:
    """The indices :func:`pack_rows` packed."""
    first, gaps = packed
    if gaps.dtype.kind == "i":
        return gaps.astype(np.int64)
    return first + np.concatenate([[0], np.cumsum(gaps, dtype=np.int64)])


def is_daemonic() -> bool:
    """Whether this process is daemonic (Python refuses it child processes)."""
    return multiprocessing.current_process().daemon


def _pair(sample, dataset) -> tuple:
    if not isinstance(sample, (tuple, list)) or len(sample) != 2:
        raise ValueError(
            f"{type(dataset).__name__}[0] is a {type(sample).__name__}; a dataset to train on "
            "returns (features, target) pairs, as skorch's Dataset does.")
    return sample


def numpy_sample(value):
    """A sample (or collated batch) as numpy: tensors converted, dicts of them too."""
    if isinstance(value, torch.Tensor):
        return value.numpy()
    return each(value, numpy_sample) if isinstance(value, dict) else np.asarray(value)


def read_example(dataset, collate_fn=None):
    """The first sample as a batch of one (numpy), and its target; reads one sample."""
    X, y = _pair(dataset[0], dataset)
    return numpy_sample((collate_fn or torch_collate)([(X, y)])[0]), np.asarray(numpy_sample(y))


def read_targets(dataset, start: int, stop: int) -> np.ndarray:
    """The targets of samples ``start`` to ``stop``, read in this process (a survey task)."""
    return np.asarray([numpy_sample(_pair(dataset[i], dataset)[1]) for i in range(start, stop)])


def _process_options(loader: dict) -> dict:
    options = dict(loader)
    if not options.get("num_workers"):
        for key in ("prefetch_factor", "worker_init_fn", "multiprocessing_context", "timeout"):
            options.pop(key, None)
    return options


class _Batches:
    """The batch sampler of a shard's loader: the index lists the current round reads."""

    def __init__(self):
        self.lists: list = []

    def __iter__(self):
        return iter(self.lists)

    def __len__(self):
        return len(self.lists)


class DatasetShard:
    """A replica's samples of a dataset, read on its worker as training reaches them.

    Attributes
    ----------
    dataset : torch.utils.data.Dataset
    rows, valid_rows : numpy.ndarray
        Dataset indices of the training and hold-out samples.
    replica : int
    convert : dict
        How batches become what the module expects (:func:`convert_rows`).
    loader : dict
        DataLoader options (:data:`LOADER_OPTIONS`).
    """

    def __init__(self, dataset, rows, valid_rows, replica: int, convert: dict, loader: dict):
        self.dataset = dataset
        self.rows = np.asarray(rows, dtype=np.int64)
        self.valid_rows = np.asarray(valid_rows, dtype=np.int64)
        self.replica = int(replica)
        self.convert = convert
        self.loader = dict(loader)

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def n_valid(self) -> int:
        """Number of hold-out samples."""
        return len(self.valid_rows)

    def __sizeof__(self) -> int:
        return object.__sizeof__(self) + self.rows.nbytes + self.valid_rows.nbytes

    def read(self, run_id: str, lists: list):
        """``(X, y)`` tensors of each list of dataset indices, read through the loader.

        One loader per replica serves its rounds and its hold-out, one
        reader at a time.
        """
        if not lists:
            return
        reader, batches, lock = _loader(run_id, self)
        with lock:
            batches.lists = lists
            for batch in reader:
                X, y = convert_rows(numpy_sample(batch[0]), numpy_sample(batch[1]),
                                    **self.convert)
                yield each(X, torch.from_numpy), None if y is None else torch.from_numpy(y)

    def batches(self, plan):
        """``(X, y)`` tensors of each step of a round (stops where the epoch ends)."""
        lists = []
        for positions in plan.positions(len(self)):
            if len(positions) == 0:
                break
            lists.append(self.rows[positions].tolist())
        return self.read(plan.run_id, lists)

    def valid_batches(self, batch_size: int, run_id: str):
        """``(X, y)`` tensors of the hold-out samples, ``batch_size`` at a time."""
        step = max(int(batch_size), 1)
        lists = [self.valid_rows[i:i + step].tolist()
                 for i in range(0, len(self.valid_rows), step)]
        return self.read(run_id, lists)


def make_dataset_shard(dataset, rows: tuple, valid: tuple, *, replica: int, loader: dict,
                       preprocessor=None, x_dtype=np.float32, index_features: bool = False,
                       classes=None, y_dtype=None, y_2d: bool = False, holdout=None,
                       stratify: bool = False, seed: int = 0) -> DatasetShard:
    """Build a :class:`DatasetShard` on the worker (the ``daskdist-shard`` task).

    ``rows`` are the shard's dataset indices and ``valid`` the positions of
    its hold-out among them, both packed (:func:`pack_rows`); reads nothing.
    ``holdout``, ``stratify`` and ``seed`` are unused: the client chose the
    hold-out. The other parameters are those of
    :func:`daskdist.data.shards.make_shard`.
    """
    if preprocessor is not None:
        raise ValueError("A preprocessor transforms arrays; a Dataset transforms its own "
                         "samples in __getitem__.")
    indices = unpack_rows(rows)
    positions = unpack_rows(valid)
    mask = np.ones(len(indices), dtype=bool)
    mask[positions] = False
    convert = {"x_dtype": x_dtype, "index_features": index_features, "classes": classes,
               "y_dtype": y_dtype, "y_2d": y_2d}
    return DatasetShard(dataset, indices[mask], indices[positions], replica, convert, loader)


_MAX_LOADERS = 32
_loaders: OrderedDict = OrderedDict()
_loaders_lock = threading.Lock()


def _loader(run_id: str, shard: DatasetShard):
    """This worker's loader of ``shard`` for run ``run_id`` (made on first use)."""
    key = (run_id, shard.replica)
    with _loaders_lock:
        held = _loaders.get(key)
        if held is not None and held[0] is shard:
            _loaders.move_to_end(key)
            return held[1:]
        batches = _Batches()
        options = _process_options(shard.loader)
        if options.get("num_workers"):
            options["persistent_workers"] = True
        reader = DataLoader(shard.dataset, batch_sampler=batches, **options)
        _loaders[key] = (shard, reader, batches, threading.Lock())
        while len(_loaders) > _MAX_LOADERS:
            _loaders.popitem(last=False)
        return _loaders[key][1:]


@on_drop_run
def drop_loaders(run_id: str) -> int:
    """Let go of this worker's loaders of a finished fit (their reading processes stop)."""
    with _loaders_lock:
        keys = [k for k in _loaders if k[0] == run_id]
        for k in keys:
            del _loaders[k]
    return len(keys)
