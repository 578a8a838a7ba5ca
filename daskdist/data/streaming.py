"""Streaming shards: a replica reads its chunks while it trains, for data larger than memory.

A persisted :class:`~daskdist.data.shards.Shard` keeps all of a replica's rows in
its worker's memory for the whole fit. When the shards of a worker would not
fit there, a :class:`StreamShard` takes its place: it holds the small task
graphs that read each of its chunks (from a Zarr store, say), not the rows,
and the replica reads the chunks itself, on its own worker, as training
reaches them. A worker then holds about ``buffer_chunks + 1`` chunks per
replica: the ``buffer_chunks`` being trained on and the next one, read by a
background thread while the replica trains.

The order of an epoch, for a shard of ``k`` chunks and a buffer of ``B``:

- with ``shuffle`` (``iterator_train__shuffle=True``) the shard's chunks are
  put in a seeded random order, new every epoch, and each chunk's training
  rows in a seeded random order, cut into ``B`` near-equal parts. The epoch
  is ``k + B - 1`` segments; segment ``t`` is part 0 of chunk ``t``, part 1
  of chunk ``t - 1``, …, part ``B - 1`` of chunk ``t - B + 1``, shuffled
  together. So each batch mixes rows from ``B`` chunks, a chunk is read once
  per epoch, and it can be let go once its last part is used;
- without ``shuffle`` the chunks and their rows come in their stored order.

Every order is a function of the seed, the epoch and the replica only, so a
round rebuilt on another worker (after a worker was lost) trains on the same
batches. Hold-out rows (``train_split``) are chosen in each chunk when the
shard is made — one read of the shard — and kept in memory, so that
validation does not read the store again; they are never trained on.
Preprocessing runs chunk by chunk, so a user callable must act row by row.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch
from dask.core import flatten
from dask.local import get_sync
from dask.optimization import cull

from ..seeds import seed_for
from ..worker.runtime import on_drop_run
from .holdout import holdout_split
from .shards import aligned, aligned_empty, convert_rows

__all__ = ["ChunkReader", "StreamShard", "StreamPiece", "chunk_readers", "make_stream_shard",
           "stream_piece", "join_stream_pieces", "drop_streams"]


class ChunkReader:
    """Reads the chunks of one shard on a worker, outside the scheduler.

    Holds, for each chunk, the part of the input's task graph that makes it
    (for a Zarr-backed array: the store and the chunk to read), and runs it
    with Dask's synchronous scheduler in the calling thread.

    Parameters
    ----------
    graphs : list of dict
        One standalone task graph per chunk.
    x_keys, y_keys : list
        The key of each chunk's features and targets (``None`` entries: no
        targets).
    sizes : list of int
        Samples in each chunk.
    chunk_ids : list of int
        Index of each chunk in the whole input (seeds derive from it).
    """

    def __init__(self, graphs, x_keys, y_keys, sizes, chunk_ids):
        self.graphs = graphs
        self.x_keys = x_keys
        self.y_keys = y_keys
        self.sizes = [int(s) for s in sizes]
        self.chunk_ids = [int(c) for c in chunk_ids]

    def __len__(self) -> int:
        return len(self.graphs)

    def subset(self, slots) -> ChunkReader:
        """The reader of chunks ``slots`` of this one (their graphs, not their data)."""
        return ChunkReader([self.graphs[s] for s in slots], [self.x_keys[s] for s in slots],
                           [self.y_keys[s] for s in slots], [self.sizes[s] for s in slots],
                           [self.chunk_ids[s] for s in slots])

    @classmethod
    def joined(cls, readers) -> ChunkReader:
        """One reader of the chunks of ``readers``, in order."""
        return cls([g for r in readers for g in r.graphs], [k for r in readers for k in r.x_keys],
                   [k for r in readers for k in r.y_keys], [s for r in readers for s in r.sizes],
                   [c for r in readers for c in r.chunk_ids])

    def read(self, slot: int):
        """Features and targets (or ``None``) of the shard's chunk ``slot``."""
        keys = [self.x_keys[slot]] + ([self.y_keys[slot]] if self.y_keys[slot] is not None
                                      else [])
        values = get_sync(self.graphs[slot], keys)
        X = np.asarray(values[0])
        y = np.asarray(values[1]) if len(values) > 1 else None
        return X, y


def chunk_readers(X, y, chunk_plan) -> list[ChunkReader]:
    """One :class:`ChunkReader` per shard of ``chunk_plan`` (chunk indices per shard).

    ``X`` (and ``y``) are dask arrays with one chunk along every axis but the
    first. Raises ``ValueError`` when a chunk depends on data held in cluster
    memory (a persisted array): streaming re-reads chunks from their source.
    """
    from distributed import Future

    graph = dict(X.__dask_graph__())
    if y is not None:
        graph.update(y.__dask_graph__())
    x_keys = list(flatten(X.__dask_keys__()))
    y_keys = list(flatten(y.__dask_keys__())) if y is not None else [None] * len(x_keys)
    readers = []
    for chunks in chunk_plan:
        graphs = []
        for c in chunks:
            wanted = [x_keys[c]] + ([y_keys[c]] if y_keys[c] is not None else [])
            part, _ = cull(graph, wanted)
            if any(isinstance(v, Future) for v in part.values()):
                raise ValueError(
                    "streaming=True reads each chunk from where the input comes from, but "
                    "this input is held in cluster memory (a persisted array); use "
                    "streaming=False (or 'auto') to train on it where it is.")
            graphs.append(part)
        readers.append(ChunkReader(graphs, [x_keys[c] for c in chunks],
                                   [y_keys[c] for c in chunks],
                                   [X.chunks[0][c] for c in chunks], chunks))
    return readers


@dataclass
class StreamShard:
    """A replica's shard read chunk by chunk during training.

    Has the interface of :class:`~daskdist.data.shards.Shard` that rounds and
    validation use (``len``, ``batches``, ``X_valid``…), but holds only the
    hold-out rows; see the module docstring.
    """

    reader: ChunkReader
    valid_positions: list  # per chunk, the rows held out (positions in the chunk)
    X_valid: np.ndarray
    y_valid: np.ndarray | None
    replica: int
    buffer_chunks: int
    convert: dict = field(default_factory=dict)

    def __post_init__(self):
        self.X_valid, self.y_valid = aligned(self.X_valid), aligned(self.y_valid)
        self.train_sizes = np.asarray(
            [n - len(v) for n, v in zip(self.reader.sizes, self.valid_positions)],
            dtype=np.int64)

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.X_valid, self.y_valid = aligned(self.X_valid), aligned(self.y_valid)

    def __len__(self) -> int:
        return int(self.train_sizes.sum())

    @property
    def n_valid(self) -> int:
        """Number of hold-out samples."""
        return len(self.X_valid)

    def __sizeof__(self) -> int:
        arrays = [self.X_valid, self.y_valid, *self.valid_positions]
        return object.__sizeof__(self) + sum(a.nbytes for a in arrays if a is not None)

    def train_positions(self, slot: int) -> np.ndarray:
        """Positions, in chunk ``slot``, of its training rows."""
        valid = self.valid_positions[slot]
        n = self.reader.sizes[slot]
        if not len(valid):
            return np.arange(n)
        mask = np.ones(n, dtype=bool)
        mask[valid] = False
        return np.flatnonzero(mask)

    def load(self, slot: int):
        """Read chunk ``slot`` and convert it for the module (any thread)."""
        X, y = self.reader.read(slot)
        return convert_rows(X, y, **self.convert)

    def batches(self, plan):
        """``(X, y)`` tensors of each step of a round, read from the chunks as needed."""
        stream = _stream(plan.run_id, self)
        layout = stream.layout(plan.epoch, plan.random_state, plan.shuffle)
        n, b = len(self), plan.batch_size
        for k in range(plan.n_steps):
            start = (plan.first_step + k) * b
            if start >= n:
                return
            yield stream.batch(layout, start, min(start + b, n))


def make_stream_shard(reader: ChunkReader, *, replica: int, buffer_chunks: int,
                      preprocessor=None, x_dtype=np.float32, index_features: bool = False,
                      classes=None, y_dtype=None, y_2d: bool = False,
                      holdout: float | None = None, stratify: bool = False,
                      seed: int = 0, chunk_seeds=None) -> StreamShard:
    """Build a :class:`StreamShard` on the worker (the ``daskdist-shard`` task).

    With a ``holdout``, reads the shard's chunks once, one at a time, to keep
    each chunk's hold-out rows; otherwise reads nothing. The parameters are
    those of :func:`daskdist.data.shards.make_shard`; ``chunk_seeds`` gives
    each chunk's hold-out seed (default: from ``seed`` and the chunk's index),
    so that a shard made of other shards' chunks holds out the same rows.
    """
    convert = {"preprocessor": preprocessor, "x_dtype": x_dtype,
               "index_features": index_features, "classes": classes, "y_dtype": y_dtype,
               "y_2d": y_2d}
    valid_positions, xs, ys = [], [], []
    for slot, (size, chunk) in enumerate(zip(reader.sizes, reader.chunk_ids)):
        if not holdout:
            valid_positions.append(np.zeros(0, dtype=np.int64))
            continue
        X, y = convert_rows(*reader.read(slot), **convert)
        chunk_seed = seed_for(seed, chunk) if chunk_seeds is None else chunk_seeds[slot]
        _, valid = holdout_split(size, holdout, labels=y if stratify else None,
                                 random_state=chunk_seed)
        valid_positions.append(valid)
        xs.append(X[valid])
        ys.append(None if y is None else y[valid])
    if xs:
        X_valid = np.concatenate(xs)
        y_valid = None if ys[0] is None else np.concatenate(ys)
    else:  # the dtypes of the training rows, without reading any
        X_valid, y_valid = _empty_rows(reader, convert)
    return StreamShard(reader, valid_positions, X_valid, y_valid, replica, int(buffer_chunks),
                       convert)


@dataclass
class StreamPiece:
    """Some chunks of a streamed shard on their way to another: readers and hold-out rows."""

    reader: ChunkReader
    valid_positions: list
    X_valid: np.ndarray
    y_valid: np.ndarray | None
    buffer_chunks: int
    convert: dict


def stream_piece(shard: StreamShard, slots) -> StreamPiece:
    """Chunks ``slots`` of ``shard``, with their hold-out rows; reads no chunk.

    Used when replicas join or leave (:mod:`daskdist.driver.membership`): a
    re-planned streamed shard is made of whole chunks of the old ones, which
    its replica then reads itself.
    """
    counts = np.cumsum([0] + [len(v) for v in shard.valid_positions])
    rows = np.concatenate([np.arange(counts[s], counts[s + 1]) for s in slots] or
                          [np.zeros(0, dtype=np.int64)]).astype(np.int64)
    return StreamPiece(shard.reader.subset(slots), [shard.valid_positions[s] for s in slots],
                       shard.X_valid[rows], None if shard.y_valid is None else shard.y_valid[rows],
                       shard.buffer_chunks, shard.convert)


def join_stream_pieces(pieces: list[StreamPiece], replica: int) -> StreamShard:
    """One streamed shard of ``pieces`` (in order), for ``replica``."""
    y_valid = [p.y_valid for p in pieces]
    return StreamShard(
        ChunkReader.joined([p.reader for p in pieces]),
        [v for p in pieces for v in p.valid_positions],
        np.concatenate([p.X_valid for p in pieces]),
        None if y_valid[0] is None else np.concatenate(y_valid),
        replica, pieces[0].buffer_chunks, pieces[0].convert)


def _empty_rows(reader: ChunkReader, convert: dict):
    """Zero rows with the dtypes and shapes the module's inputs will have (reads one chunk)."""
    X, y = convert_rows(*reader.read(0), **convert)  # transformers refuse zero rows
    return X[:0], None if y is None else y[:0]


class _Layout:
    """The order of one epoch over a shard's chunks (see the module docstring)."""

    def __init__(self, shard: StreamShard, epoch: int, seed: int, shuffle: bool):
        k = len(shard.reader)
        self.shard, self.epoch, self.seed, self.shuffle = shard, epoch, seed, shuffle
        if shuffle:
            self.order = np.random.default_rng(
                seed_for(seed, 6, epoch, shard.replica)).permutation(k)
            self.B = max(1, min(shard.buffer_chunks, k))
        else:
            self.order, self.B = np.arange(k), 1
        n = shard.train_sizes[self.order]
        self._n = n
        lengths = np.zeros(k + self.B - 1, dtype=np.int64)
        for p in range(self.B):
            lengths[p:p + k] += n // self.B + (p < n % self.B)
        self.starts = np.concatenate([[0], np.cumsum(lengths)])

    def segment_of(self, position: int) -> int:
        """The segment that holds epoch position ``position``."""
        return int(np.searchsorted(self.starts, position, side="right") - 1)

    def chunks(self, t: int) -> list[int]:
        """Slots of the chunks segment ``t`` draws from."""
        lo, hi = max(0, t - self.B + 1), min(t, len(self.order) - 1)
        return [int(s) for s in self.order[lo:hi + 1]]

    def next_chunk(self, t: int) -> int | None:
        """The slot of the first chunk after segment ``t`` that is not yet in use."""
        return int(self.order[t + 1]) if t + 1 < len(self.order) else None

    def _chunk_rows(self, j: int) -> np.ndarray:
        """Training positions of the ``j``-th chunk in this epoch's order, in their order."""
        slot = int(self.order[j])
        rows = self.shard.train_positions(slot)
        if self.shuffle:
            seed = seed_for(self.seed, 8, self.epoch, self.shard.replica, slot)
            rows = np.random.default_rng(seed).permutation(rows)
        return rows

    def segment(self, t: int):
        """``(slots, positions)`` of the rows of segment ``t``, in training order."""
        slots, positions = [], []
        for p in range(self.B):
            j = t - p
            if not 0 <= j < len(self.order):
                continue
            n = int(self._n[j])
            q, r = divmod(n, self.B)
            start = p * q + min(p, r)
            part = self._chunk_rows(j)[start:start + q + (p < r)]
            slots.append(np.full(len(part), self.order[j], dtype=np.int64))
            positions.append(part)
        slots, positions = np.concatenate(slots), np.concatenate(positions)
        if self.shuffle and self.B > 1:
            perm = np.random.default_rng(
                seed_for(self.seed, 7, self.epoch, self.shard.replica, t)).permutation(len(slots))
            slots, positions = slots[perm], positions[perm]
        return slots, positions


class _Stream:
    """A replica's chunks in worker memory, and the read of the next one in the background."""

    def __init__(self, shard: StreamShard):
        self.shard = shard
        self.loaded: dict = {}  # slot -> (X, y)
        self.pending: dict = {}  # slot -> concurrent.futures.Future
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="daskdist-prefetch")
        self._layouts: dict = {}
        self._segments: OrderedDict = OrderedDict()

    def layout(self, epoch: int, seed: int, shuffle: bool) -> _Layout:
        key = (epoch, seed, shuffle)
        if key not in self._layouts:
            self._layouts = {k: v for k, v in self._layouts.items() if k[0] >= epoch - 1}
            self._layouts[key] = _Layout(self.shard, epoch, seed, shuffle)
        return self._layouts[key]

    def _segment(self, layout: _Layout, t: int):
        key = (layout.epoch, t)
        if key not in self._segments:
            self._segments[key] = (layout.starts[t], *layout.segment(t))
            while len(self._segments) > 2:
                self._segments.popitem(last=False)
        return self._segments[key]

    def batch(self, layout: _Layout, start: int, stop: int):
        """Tensors of the rows at epoch positions ``[start, stop)``."""
        first, last = layout.segment_of(start), layout.segment_of(stop - 1)
        needed = {s for t in range(first, last + 1) for s in layout.chunks(t)}
        upcoming = layout.next_chunk(last)
        if upcoming is None:  # the next epoch's first chunk
            upcoming = self.layout(layout.epoch + 1, layout.seed, layout.shuffle).chunks(0)[0]
        self._hold(needed, upcoming)
        slots, positions = [], []
        for t in range(first, last + 1):
            offset, s, p = self._segment(layout, t)
            lo, hi = max(start - offset, 0), min(stop - offset, len(s))
            slots.append(s[lo:hi])
            positions.append(p[lo:hi])
        slots, positions = np.concatenate(slots), np.concatenate(positions)
        X0, y0 = self.loaded[int(slots[0])]
        X = aligned_empty((len(slots), *X0.shape[1:]), X0.dtype)
        y = None if y0 is None else aligned_empty((len(slots), *y0.shape[1:]), y0.dtype)
        for slot in np.unique(slots):
            mask = slots == slot
            Xc, yc = self.loaded[int(slot)]
            X[mask] = Xc[positions[mask]]
            if y is not None:
                y[mask] = yc[positions[mask]]
        return torch.from_numpy(X), None if y is None else torch.from_numpy(y)

    def _hold(self, needed: set, upcoming: int | None) -> None:
        """Keep the ``needed`` chunks in memory, let go of others, and start reading the next."""
        keep = needed | ({upcoming} if upcoming is not None else set())
        for slot in [s for s in self.loaded if s not in keep]:
            del self.loaded[slot]
        for slot in [s for s in self.pending if s not in keep]:
            self.pending.pop(slot).cancel()
        for slot in sorted(needed):
            if slot not in self.loaded:
                future = self.pending.pop(slot, None)
                self.loaded[slot] = (future.result() if future is not None
                                     else self.shard.load(slot))
        if upcoming is not None and upcoming not in self.loaded and upcoming not in self.pending:
            self.pending[upcoming] = self._pool.submit(self.shard.load, upcoming)

    def close(self) -> None:
        for future in self.pending.values():
            future.cancel()
        self._pool.shutdown(wait=False)
        self.loaded.clear()
        self.pending.clear()


_MAX_STREAMS = 16
_streams: OrderedDict = OrderedDict()
_streams_lock = threading.Lock()


def _stream(run_id: str, shard: StreamShard) -> _Stream:
    """The worker's stream of ``shard`` for run ``run_id`` (made on first use)."""
    key = (run_id, shard.replica)
    with _streams_lock:
        stream = _streams.get(key)
        if stream is not None and stream.shard is shard:
            _streams.move_to_end(key)
            return stream
        if stream is not None:  # the shard was rebuilt (after a worker was lost)
            stream.close()
        stream = _streams[key] = _Stream(shard)
        while len(_streams) > _MAX_STREAMS:
            _streams.popitem(last=False)[1].close()
        return stream


@on_drop_run
def drop_streams(run_id: str) -> int:
    """Close this worker's streams of a finished fit; return how many were closed."""
    with _streams_lock:
        keys = [k for k in _streams if k[0] == run_id]
        for k in keys:
            _streams.pop(k).close()
    return len(keys)
