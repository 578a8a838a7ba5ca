"""A fit's shards as the data source placed them, and the options that say how.

:class:`ShardOptions` is how a fit's data becomes shards (the plan, the
hold-out, how rows are converted, streaming); :class:`ShardSet` is what
:meth:`daskdist.data.sources.Source.place` returns: each shard's rows, its
worker, its hold-out, and how to build it again.
"""

from __future__ import annotations

import contextvars
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace

import numpy as np

from ..seeds import seed_for

__all__ = ["ShardOptions", "ShardSet"]


@dataclass(frozen=True)
class ShardOptions:
    """How a fit's data becomes shards.

    Attributes
    ----------
    sharding : {"random", "sequential", "stratified"}
        The shard plan (:mod:`daskdist.data.sharding`).
    holdout : float or None
        Fraction of each shard held out for validation.
    stratify : bool
        Keep class proportions in the hold-out.
    convert : dict
        How rows become what the module expects, passed to
        :func:`~daskdist.data.shards.make_shard` (preprocessor, dtypes, classes).
    direct_scatter : bool or None
        Send numpy shards straight to their workers (None: as the config
        ``daskdist.shards.direct-scatter`` says).
    streaming : {"auto", True, False}
        Stream dask shards chunk by chunk (:mod:`daskdist.data.streaming`).
    buffer_chunks : int
        Chunks a streaming replica shuffles together.
    """

    sharding: str = "random"
    holdout: float | None = None
    stratify: bool = False
    convert: dict = field(default_factory=dict)
    direct_scatter: bool | None = None
    streaming: object = "auto"
    buffer_chunks: int = 4

    @classmethod
    def from_keywords(cls, data: ShardOptions | None, **keywords) -> ShardOptions:
        """``data`` (or the defaults) with the deprecated ``Trainer`` keywords that are set.

        They warn with a ``DeprecationWarning`` (``shard_kwargs`` is ``convert``).
        """
        given = {k: v for k, v in keywords.items() if v is not None}
        if given:
            warnings.warn(
                f"Trainer({', '.join(sorted(given))}=...) is deprecated; pass "
                "data=daskdist.data.sources.ShardOptions(...) instead (shard_kwargs is its "
                "'convert').", DeprecationWarning, stacklevel=3)
        data = data if data is not None else cls()
        return replace(data, **{_TRAINER_KEYWORDS[k]: v for k, v in given.items()})


#: Trainer keywords that only say how the data becomes shards (now ``data=``).
_TRAINER_KEYWORDS = {"sharding": "sharding", "holdout": "holdout", "stratify": "stratify",
                     "shard_kwargs": "convert", "direct_scatter": "direct_scatter",
                     "streaming": "streaming", "buffer_chunks": "buffer_chunks"}


class ShardSet:
    """A fit's shards as placed: what each holds, where it trains, how to build it again.

    Made by :meth:`Source.place`; the driver submits each shard from it at
    the start of a fit and again when the worker holding one is lost.

    Attributes
    ----------
    plan : list of numpy.ndarray
        The source rows of each shard.
    workers : list of str
        The worker each shard (and its replica) trains on.
    valid_positions : list of numpy.ndarray or None
        Each shard's hold-out positions, when chosen on the client; None
        when the workers choose them (or there is no hold-out).
    streaming : bool
        Whether the shards are streamed chunk by chunk.
    """

    def __init__(self, source, plan, workers, valid_positions, options: ShardOptions,
                 random_state: int):
        self.source = source
        self.plan = plan
        self.workers = list(workers)
        self.valid_positions = valid_positions
        self.options = options
        self.random_state = random_state

    @property
    def streaming(self) -> bool:
        """Whether the shards are read chunk by chunk while they train."""
        return bool(self.source.streaming)

    def submit(self, client, index: int, worker: str, *, run_id: str):
        """Build shard ``index`` on ``worker`` (a ``daskdist-shard`` task); its future."""
        o = self.options
        valid = None if self.valid_positions is None else self.valid_positions[index]
        return self.source.submit_shard(
            client, index, self.plan[index], worker, run_id=run_id, valid_positions=valid,
            holdout=o.holdout, stratify=o.stratify, seed=self.random_state + index,
            **o.convert)

    def submit_chunks(self, client, index: int, chunks, worker: str, *, run_id: str):
        """Build streamed shard ``index`` of the input's ``chunks`` on ``worker``; its future.

        For a streamed shard re-planned from other shards' chunks
        (:mod:`daskdist.driver.membership`): each chunk keeps the hold-out
        rows it had in the shard it was first placed in.
        """
        o = self.options
        origin = {c: i for i, placed in enumerate(self.source.stream_chunks()) for c in placed}
        seeds = [seed_for(self.random_state + origin[c], c) for c in chunks]
        return self.source.submit_stream(
            client, index, chunks, worker, run_id=run_id, holdout=o.holdout,
            stratify=o.stratify, chunk_seeds=seeds,
            key=(f"daskdist-shard-{run_id}-rebuilt", int(index)), **o.convert)

    def submit_all(self, client, workers: list[str], *, run_id: str) -> list:
        """Build every shard, shard ``i`` on ``workers[i]``; their futures.

        Shards sent from the client (numpy inputs) travel to their workers
        at the same time, each from a thread of its own, in a copy of the
        caller's context (Dask's annotations, such as the fit's span, are
        context variables).
        """
        if len(workers) == 1:
            return [self.submit(client, 0, workers[0], run_id=run_id)]
        contexts = [contextvars.copy_context() for _ in workers]
        with ThreadPoolExecutor(min(len(workers), 8), "daskdist-send") as pool:
            return list(pool.map(
                lambda i: contexts[i].run(self.submit, client, i, workers[i], run_id=run_id),
                range(len(workers))))

    def valid_rows(self) -> np.ndarray | None:
        """Source rows held out for validation (client-side hold-outs only)."""
        if self.valid_positions is None:
            return None
        return np.concatenate([rows[v] for rows, v in zip(self.plan, self.valid_positions)])
