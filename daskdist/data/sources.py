"""Sources: where training data comes from, and how it becomes shards.

The driver asks a source once, at the start of a fit, to place its shards
(:meth:`Source.place`): the source plans them (:mod:`.sharding`), decides the
hold-out (:mod:`.holdout`), prepares what the shards share and says which
worker each one trains on, and returns a :class:`ShardSet` from which the
driver submits each shard, at the start and again when a worker holding one
is lost. A source answers, on the client and without loading the features,
how many samples there are and (when asked) what the labels are; its kinds:

- :class:`NumpySource` sends each shard's rows once, straight to its worker.
  Dask cannot recompute scattered data, so the source keeps what it needs to
  send a shard again (:meth:`Source.submit_shard` with another worker).
- :class:`DaskArraySource` plans shards of whole chunks
  (:func:`~daskdist.data.sharding.plan_chunks`) and computes each chunk on the
  worker of the shard it belongs to (``daskdist-take`` tasks pinned there),
  where the shard is assembled: a worker reads its own chunks (from a Zarr
  store, say) and no chunk travels between workers. The client never computes
  the array, and a lost shard is recomputed from lineage. Chunks already in
  worker memory (a persisted array) decide which worker trains which shard.
  When a worker's shards would not fit in its memory, the shards are streamed
  instead (:mod:`daskdist.data.streaming`): each replica reads its chunks, on its
  worker, while it trains.

xarray, Zarr and dataframe inputs become dask arrays first (:mod:`daskdist.data.inputs`).
"""

from __future__ import annotations

import abc
import logging

import dask
import dask.array as da
import numpy as np

from .._compat import who_has
from .._compat import workers as cluster_workers
from .holdout import client_holdout
from .named import is_named, n_rows, take
from .shard_set import ShardOptions, ShardSet
from .sharding import chunk_rows, plan_chunks, plan_shards
from .shards import RawShard, make_shard
from .streaming import chunk_readers, make_stream_shard

logger = logging.getLogger(__name__)

__all__ = ["Source", "NumpySource", "DaskArraySource", "ShardOptions", "ShardSet", "as_source",
           "check_streaming", "STREAMING"]

#: Values of the ``streaming`` parameter.
STREAMING = (True, False, "auto")


class Source(abc.ABC):
    """Training data that can be planned on the client and sharded onto workers."""

    #: True when the features live in a Dask graph rather than in client memory.
    lazy = False
    #: True when the shards are read chunk by chunk while they train.
    streaming = False
    #: Why shards cannot be cut and joined when the replica count changes (None: they can).
    resize_refusal: str | None = None

    def __init__(self, X, y=None):
        if y is not None and len(y) != n_rows(X):
            raise ValueError(
                f"X has {n_rows(X)} samples but y has {len(y)}; they must match."
            )
        self.X = X
        self.y = y

    @property
    def n_samples(self) -> int:
        """Number of samples."""
        return n_rows(self.X)

    @abc.abstractmethod
    def labels(self) -> np.ndarray | None:
        """The targets as a numpy array (computed for lazy sources)."""

    def place(self, client, n_shards: int, workers: list[str], *, options: ShardOptions,
              random_state: int, run_id: str) -> ShardSet:
        """Plan the shards, decide their hold-out, prepare them; where each one trains.

        Parameters
        ----------
        client : distributed.Client
        n_shards : int
            Shards to make (one per replica).
        workers : list of str
            The worker the strategy places each replica on; the data may
            choose others (chunks already held by workers).
        options : ShardOptions
        random_state : int
            Seed of the plan and of the hold-out.
        run_id : str
            Names the fit's tasks.
        """
        plan = self.plan(n_shards, options.sharding, random_state=random_state)
        valid = None
        if options.holdout and self.holdout_on_client():  # choose where the labels are
            labels = self.labels() if options.stratify else None
            valid = client_holdout(plan, options.holdout, labels=labels,
                                   random_state=random_state)
        preferred = self.prepare(client, plan, run_id=run_id, workers=workers)
        return ShardSet(self, plan, preferred or workers, valid, options, random_state)

    def plan(self, n_shards: int, sharding: str, *, random_state=None) -> list[np.ndarray]:
        """Rows of each shard (per-sample plans; chunked sources plan whole chunks)."""
        labels = self.labels() if sharding == "stratified" else None
        return plan_shards(self.n_samples, n_shards, sharding, labels=labels,
                           random_state=random_state)

    def holdout_on_client(self) -> bool:
        """Whether the hold-out is chosen on the client (the labels are there)."""
        return not self.lazy

    def prepare(self, client, plan, *, run_id: str, workers=None):  # noqa: B027 - optional
        """Submit whatever the shards of ``plan`` share (lazy sources).

        Returns
        -------
        list of str or None
            The worker each shard should train on, where the data says so
            (chunks already held by workers); None to keep ``workers``.
        """

    @abc.abstractmethod
    def _raw(self, client, index: int, rows: np.ndarray, worker: str, valid_positions):
        """Return a future (or list of futures) of the :class:`RawShard`."""

    def submit_shard(self, client, index: int, rows: np.ndarray, worker: str, *,
                     run_id: str, valid_positions=None, **shard_kwargs):
        """Put shard ``index`` (the given rows) on ``worker``; return its future.

        The shard is built by a ``daskdist-shard`` task pinned to ``worker``
        that may run elsewhere if the worker is gone.
        """
        raw = self._raw(client, index, rows, worker, valid_positions)
        return client.submit(
            make_shard, raw, replica=index, **shard_kwargs,
            key=(f"daskdist-shard-{run_id}", int(index)),
            workers=[worker], allow_other_workers=True, pure=False,
        )


#: Seconds to wait for the chosen worker before sending a shard to another one.
_SCATTER_WAIT = 5


class NumpySource(Source):
    """Features and targets held in client memory (numpy arrays)."""

    def __init__(self, X, y=None, *, direct: bool = True, sample_weight=None):
        super().__init__(X if is_named(X) or hasattr(X, "shape") else np.asarray(X),
                         None if y is None else np.asarray(y))
        self.direct = direct
        self.w = sample_weight

    def labels(self):
        return self.y

    def _raw(self, client, index, rows, worker, valid_positions):
        if len(rows) and rows[-1] - rows[0] + 1 == len(rows) and (np.diff(rows) == 1).all():
            rows = slice(int(rows[0]), int(rows[-1]) + 1)  # a run of rows: sent without a copy
        raw = RawShard(take(self.X, rows), None if self.y is None else self.y[rows],
                       valid_positions,
                       None if self.w is None else self.w[rows])
        try:
            return client.scatter(raw, workers=[worker], direct=self.direct, hash=False,
                                  timeout=_SCATTER_WAIT)
        except (TimeoutError, OSError):
            # The worker died since it was chosen: any live worker will do; the
            # shard task follows its data.
            logger.info("worker %s is gone; sending shard %d to another worker", worker, index)
            return client.scatter(raw, direct=self.direct, hash=False)


class DaskArraySource(Source):
    """Features (and optionally targets) in dask arrays chunked along samples.

    Parameters
    ----------
    X, y : dask.array.Array
        Features and targets (``y`` may be any array of the same length).
    streaming : {"auto", True, False}
        Stream the shards chunk by chunk rather than keep them in worker
        memory; ``"auto"`` streams when a worker's shards would take more
        than ``daskdist.shards.stream-above`` of its memory limit (and the
        input is not already held in cluster memory).
    buffer_chunks : int
        Chunks a streaming replica shuffles together (and keeps in memory).
    """

    lazy = True

    def __init__(self, X, y=None, *, streaming="auto", buffer_chunks: int = 4):
        if any(np.isnan(c) for c in X.chunks[0]):
            raise ValueError(
                "X has unknown chunk sizes along the sample axis; call "
                "X.compute_chunk_sizes() first."
            )
        X = X.rechunk({i: -1 for i in range(1, X.ndim)})
        if y is not None:
            y = _along_samples(y, X.chunks[0])
        super().__init__(X, y)
        self.requested_streaming = streaming
        self.buffer_chunks = buffer_chunks
        #: Whether the shards are streamed (decided by :meth:`prepare`).
        self.streaming = streaming is True
        self._labels = None
        self._pieces = None
        self._readers = None

    def labels(self):
        # Only the targets travel to the client (stratified plans need them).
        if self.y is None:
            return None
        if self._labels is None:
            self._labels = self.y.compute()
        return self._labels

    def plan(self, n_shards, sharding, *, random_state=None):
        """Shards of whole chunks; rechunks along the samples first when it must."""
        self._even_chunks(n_shards)
        sizes = self.X.chunks[0]
        counts = None
        if sharding == "stratified":
            labels = self.labels()
            classes, codes = np.unique(labels, return_inverse=True)
            chunk_of = np.repeat(np.arange(len(sizes)), sizes)
            counts = np.zeros((len(sizes), len(classes)), dtype=np.int64)
            np.add.at(counts, (chunk_of, codes), 1)
        self.chunk_plan = plan_chunks(sizes, n_shards, sharding, class_counts=counts,
                                      random_state=random_state)
        return [chunk_rows(sizes, chunks) for chunks in self.chunk_plan]

    def _even_chunks(self, n_shards: int) -> None:
        """Rechunk along samples when whole chunks cannot make shards of similar size.

        That is: fewer chunks than shards, chunks more than 2x apart in size
        (a short last chunk aside), or shards of whole chunks more than 25%
        apart (5 equal chunks over 3 replicas, say).
        """
        sizes = np.asarray(self.X.chunks[0])
        body = sizes[:-1] if len(sizes) > 1 else sizes  # a short last chunk is normal
        if len(sizes) >= n_shards and body.max() <= 2 * max(body.min(), 1):
            loads = np.zeros(n_shards)
            for size in np.sort(sizes)[::-1]:  # the most even split whole chunks allow, about
                loads[np.argmin(loads)] += size
            if loads.max() <= 1.25 * loads.min():
                return
        n_chunks = max(len(sizes), n_shards)
        n_chunks += -n_chunks % n_shards  # as many chunks on every shard
        size = int(np.ceil(self.n_samples / n_chunks))
        logger.info("rechunking the input along the samples from %d chunks (%d to %d samples) "
                    "to chunks of %d samples, so that %d shards are made of whole, similar "
                    "chunks", len(sizes), sizes.min(), sizes.max(), size, n_shards)
        self.X = self.X.rechunk({0: size})
        if self.y is not None:
            self.y = self.y.rechunk({0: size})
        self._labels = None

    def prepare(self, client, plan, *, run_id, workers=None):
        chunk_plan = getattr(self, "chunk_plan", None) or _chunks_of(plan, self.X.chunks[0])
        preferred = _held_by(client, self.X, chunk_plan, workers) if workers else None
        targets = preferred or workers
        if self.requested_streaming == "auto":
            self.streaming = preferred is None and self._too_big(client, plan, targets)
        if self.streaming:
            self._readers = chunk_readers(self.X, self.y, chunk_plan)
            return None
        x_chunks = self.X.to_delayed().ravel()
        y_chunks = (self.y.to_delayed().ravel() if self.y is not None
                    else [None] * len(x_chunks))
        self._pieces = {}
        for index, chunks in enumerate(chunk_plan):
            pieces = [dask.delayed(_take_rows)(
                x_chunks[c], y_chunks[c], None,
                dask_key_name=(f"daskdist-take-{run_id}", int(index), int(c))) for c in chunks]
            # One graph per shard, restricted to its worker: the chunks are read there.
            self._pieces[index] = client.compute(
                pieces, workers=[targets[index]] if targets else None,
                allow_other_workers=True)
        return preferred

    def _too_big(self, client, plan, workers) -> bool:
        """Whether some worker's shards would take more than its share of memory for them."""
        if not workers:
            return False
        share = dask.config.get("daskdist.shards.stream-above")
        limits = {w: info.get("memory_limit") or 0
                  for w, info in cluster_workers(client).items()}
        row = self.X.dtype.itemsize * int(np.prod(self.X.shape[1:]))
        if self.y is not None:
            row += self.y.dtype.itemsize * int(np.prod(self.y.shape[1:]))
        load = {}
        for rows, worker in zip(plan, workers):
            load[worker] = load.get(worker, 0) + len(rows) * row
        over = {w: b for w, b in load.items() if limits.get(w) and b > share * limits[w]}
        if over:
            worker = max(over, key=over.get)
            logger.info("streaming the shards from their chunks: the shards of worker %s "
                        "would take %.0f MB of its %.0f MB memory limit (more than %.0f%%, "
                        "daskdist.shards.stream-above)", worker, over[worker] / 1e6,
                        limits[worker] / 1e6, 100 * share)
        return bool(over)

    def submit_shard(self, client, index, rows, worker, *, run_id, valid_positions=None,
                     **shard_kwargs):
        if not self.streaming:
            return super().submit_shard(client, index, rows, worker, run_id=run_id,
                                        valid_positions=valid_positions, **shard_kwargs)
        return client.submit(
            make_stream_shard, self._readers[index], replica=index,
            buffer_chunks=self.buffer_chunks, **shard_kwargs,
            key=(f"daskdist-shard-{run_id}", int(index)),
            workers=[worker], allow_other_workers=True, pure=False,
        )

    def stream_chunks(self) -> list[list[int]]:
        """The input's chunks of each streamed shard, as placed."""
        return [list(reader.chunk_ids) for reader in self._readers]

    def submit_stream(self, client, index: int, chunks, worker: str, *, run_id: str, key,
                      **shard_kwargs):
        """Build a streamed shard of the input's ``chunks`` on ``worker``; its future."""
        reader = chunk_readers(self.X, self.y, [list(chunks)])[0]
        return client.submit(make_stream_shard, reader, replica=index,
                             buffer_chunks=self.buffer_chunks, **shard_kwargs, key=key,
                             workers=[worker], allow_other_workers=True, pure=False)

    def _raw(self, client, index, rows, worker, valid_positions):
        if not np.all(rows[:-1] <= rows[1:]):
            raise ValueError("Shards of a dask array must list rows in increasing order.")
        return self._pieces[index]


def _take_rows(x_chunk, y_chunk, local):
    """A chunk's rows (all of them when ``local`` is None) as a raw shard piece."""
    x = np.asarray(x_chunk)
    y = None if y_chunk is None else np.asarray(y_chunk)
    if local is not None:
        x, y = x[local], None if y is None else y[local]
    return RawShard(x, y)


def _chunks_of(plan, chunk_sizes) -> list[np.ndarray]:
    """The chunks of each shard of a plan made of whole chunks."""
    starts = np.concatenate([[0], np.cumsum(chunk_sizes)]).astype(np.int64)
    out = []
    for rows in plan:
        chunks = np.unique(np.searchsorted(starts, rows, side="right") - 1)
        if len(chunk_rows(chunk_sizes, chunks)) != len(rows):
            raise ValueError("A plan for a chunked source must hold whole chunks.")
        out.append(chunks)
    return out


def _held_by(client, X, chunk_plan, workers) -> list[str] | None:
    """Workers already holding most of each shard's chunks (a persisted ``X``), if any.

    Each worker gets at most as many shards as in ``workers``; shards whose
    chunks are held nowhere keep their worker.
    """
    keys = list(dask.core.flatten(X.__dask_keys__()))
    holders = client.run_on_scheduler(who_has, keys)
    if not any(holders):
        return None
    capacity = {w: workers.count(w) for w in set(workers)}
    order = sorted(range(len(chunk_plan)), key=lambda i: -len(chunk_plan[i]))
    chosen = list(workers)
    taken = dict.fromkeys(capacity, 0)
    for i in order:
        votes = {}
        for c in chunk_plan[i]:
            for w in holders[c]:
                if w in capacity:
                    votes[w] = votes.get(w, 0) + X.chunks[0][c]
        for w in sorted(votes, key=lambda w: -votes[w]):
            if taken[w] < capacity[w]:
                chosen[i] = w
                taken[w] += 1
                break
        else:
            chosen[i] = None
    for i, w in enumerate(chosen):
        if w is None:  # held nowhere, or its holders are full: any worker with room
            w = next(x for x in workers if taken[x] < capacity[x])
            chosen[i] = w
            taken[w] += 1
    return chosen


def _along_samples(a, sample_chunks) -> da.Array:
    """``a`` as a dask array chunked like the samples, whole along other axes."""
    chunks = (sample_chunks,) + (-1,) * (np.ndim(a) - 1)
    if isinstance(a, da.Array):
        return a.rechunk(chunks)
    return da.from_array(np.asarray(a), chunks=chunks)


def check_streaming(streaming, buffer_chunks) -> None:
    """Raise ``ValueError`` for a ``streaming`` or ``buffer_chunks`` value that is not allowed."""
    if not any(streaming is v or (isinstance(streaming, str) and streaming == v)
               for v in STREAMING):
        raise ValueError(f"streaming must be one of {STREAMING}, got {streaming!r}.")
    if isinstance(buffer_chunks, bool) or not isinstance(buffer_chunks, (int, np.integer)) \
            or buffer_chunks < 1:
        raise ValueError(f"buffer_chunks must be a positive integer, got {buffer_chunks!r}.")


def as_source(X, y=None, *, direct: bool = True, streaming="auto",
              buffer_chunks: int = 4, sample_weight=None) -> Source:
    """Wrap ``X`` (and ``y``) in the matching :class:`Source`.

    Parameters
    ----------
    X : numpy.ndarray or dask.array.Array
        Features, samples along the first axis.
    y : array-like, optional
        Targets.
    direct : bool
        Send numpy shards straight from the client to their workers.
    streaming : {"auto", True, False}
        Stream dask shards chunk by chunk (see :class:`DaskArraySource`).
    buffer_chunks : int
        Chunks a streaming replica shuffles together.
    sample_weight : numpy.ndarray, optional
        One weight per sample, carried by in-memory shards.
    """
    check_streaming(streaming, buffer_chunks)
    if sample_weight is not None and (isinstance(X, (Source, da.Array))
                                      or isinstance(y, da.Array)):
        raise ValueError(
            "sample_weight is supported for in-memory (numpy) inputs only: a dask, xarray or "
            "Zarr input's shards are assembled on the workers without weights.")
    if isinstance(X, Source):
        return X
    if isinstance(X, da.Array):
        return DaskArraySource(X, y, streaming=streaming, buffer_chunks=buffer_chunks)
    if isinstance(y, da.Array):
        return DaskArraySource(_along_samples(X, y.chunks[0]), y, streaming=streaming,
                               buffer_chunks=buffer_chunks)
    if streaming is True:
        raise ValueError(
            "streaming=True reads shards chunk by chunk from a dask array, an xarray object "
            "or a Zarr store; this X is already in memory (a numpy array), so its shards are "
            "sent to the workers. Use streaming='auto' or False.")
    if is_named(X) or (hasattr(X, "shape") and hasattr(X, "__getitem__")):
        return NumpySource(X, y, direct=direct, sample_weight=sample_weight)
    raise TypeError(
        f"daskdist cannot train on X of type {type(X).__name__}; pass a numpy array or a "
        "dask array (xarray, Zarr and dataframes are read through dask)."
    )
