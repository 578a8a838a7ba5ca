"""Finding the cluster to train on, and starting one when there is none.

Resolution, at the public edge only (library code passes the client along):

1. a scheduler address → connect to it;
2. else the current ``distributed`` client, if there is one;
3. else an embedded :class:`~distributed.LocalCluster` — processes, one
   single-threaded worker per core — started for the fit and closed after.

Embedded clusters leave ``MALLOC_TRIM_THRESHOLD_`` to glibc: the 65536 that
Dask's nanny sets by default (``distributed.nanny.pre-spawn-environ``) makes
torch training in the workers about a quarter slower, because every step frees
and re-maps its activation buffers. On a cluster you start yourself, set
``distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_`` to ``null`` (or
unset the variable) before the workers start.

Embedded clusters also quieten the workers' periodic work
(``daskdist.cluster.dask-config``): the statistical profiler, the 20 ms
event-loop tick and frequent memory/system monitoring cost about a fifth of the
replicas' training speed on two cores in our benchmark.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os

import dask.config
from distributed import Client, LocalCluster, worker_client

from .._compat import KeepRestartingNannies
from ..dashboard import ROUTES_MODULE
from ..torch_warmup import warm_up

__all__ = ["cluster_client", "held_cluster", "embedded_cluster", "embedded_cluster_config",
           "temporary_security"]

logger = logging.getLogger(__name__)

_NANNY_DEFAULT_TRIM = "65536"
#: Preloaded by the embedded cluster's workers (:mod:`daskdist.torch_warmup`).
WARM_UP_MODULE = "daskdist.torch_warmup"


def embedded_cluster_config() -> dict:
    """Dask settings applied while daskdist starts a cluster's workers."""
    trim = dask.config.get("daskdist.cluster.malloc-trim-threshold")
    threads = dask.config.get("daskdist.cluster.threads-per-worker")
    return {
        **dask.config.get("daskdist.cluster.dask-config"),
        "distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": trim,
        "distributed.nanny.pre-spawn-environ.OMP_NUM_THREADS": threads,
        "distributed.nanny.pre-spawn-environ.MKL_NUM_THREADS": threads,
        "distributed.nanny.pre-spawn-environ.OPENBLAS_NUM_THREADS": threads,
        # the scheduler serves daskdist's training page from the start
        "distributed.scheduler.http.routes": [
            *(r for r in dask.config.get("distributed.scheduler.http.routes")
              if r != ROUTES_MODULE), ROUTES_MODULE],
        # workers pay torch's one-time start-up cost as they start, not in their first round
        "distributed.worker.preload": [
            *(m for m in dask.config.get("distributed.worker.preload") if m != WARM_UP_MODULE),
            WARM_UP_MODULE],
    }


def embedded_cluster(n_workers: int | None = None, *, security=None, **kwargs) -> LocalCluster:
    """Start the local cluster daskdist uses when given no other.

    Parameters
    ----------
    n_workers : int, optional
        Worker processes; default config ``daskdist.cluster.n-workers``, else
        one per core.
    security : distributed.Security or bool, optional
        TLS for the cluster's connections. ``True`` makes throw-away
        certificates (``Security.temporary()``, which needs the
        ``cryptography`` package: ``pip install 'daskdist[tls]'``) that only
        this process holds: clients connect through the returned cluster
        (``Client(cluster)``) and a client without them is refused. Default:
        config ``daskdist.cluster.tls``.
    **kwargs
        Passed to :class:`distributed.LocalCluster` (``host`` and
        ``dashboard_address`` override config ``daskdist.cluster.host``, by
        default the loopback interface only).
    """
    n_workers = n_workers or dask.config.get("daskdist.cluster.n-workers") or os.cpu_count() or 1
    host = dask.config.get("daskdist.cluster.host")
    if security is None:
        security = bool(dask.config.get("daskdist.cluster.tls"))
    if security is True:
        security = temporary_security()
    options = {
        "n_workers": n_workers,
        "threads_per_worker": dask.config.get("daskdist.cluster.threads-per-worker"),
        "processes": True,
        "host": host,
        "dashboard_address": f"{host}:0",
        "security": security or None,
    }
    options.update(kwargs)
    warm_up()  # this process's share of torch's start-up cost, while the workers spawn
    # A default nanny started earlier in this process leaves Dask's value in
    # os.environ, where it would take precedence; hide it while workers spawn.
    inherited = os.environ.get("MALLOC_TRIM_THRESHOLD_")
    with dask.config.set(embedded_cluster_config()):
        if inherited == _NANNY_DEFAULT_TRIM:
            os.environ.pop("MALLOC_TRIM_THRESHOLD_")
        try:
            return _EmbeddedCluster(**options)
        finally:
            if inherited == _NANNY_DEFAULT_TRIM:
                os.environ["MALLOC_TRIM_THRESHOLD_"] = inherited


class _EmbeddedCluster(KeepRestartingNannies, LocalCluster):
    """The embedded cluster: a ``LocalCluster`` whose nannies keep bringing workers back."""


def temporary_security():
    """Throw-away TLS certificates for a cluster daskdist starts (needs ``cryptography``)."""
    from distributed import Security

    try:
        return Security.temporary()
    except ImportError as error:
        raise ImportError(
            "TLS for clusters daskdist starts needs the 'cryptography' package: "
            "pip install 'daskdist[tls]'."
        ) from error


@contextlib.contextmanager
def cluster_client(scheduler_address: str | None = None):
    """Yield ``(client, embedded)`` for one fit; close what it opened.

    Parameters
    ----------
    scheduler_address : str, optional
        Address of a running scheduler (``tcp://host:8786``, ``tls://…``).

    Yields
    ------
    client : distributed.Client
    embedded : bool
        True when the cluster was started for this fit (and is closed after it).
    """
    held = _held.get()
    if held is not None and held[0] == scheduler_address:
        yield held[1], False
        return
    if _in_task(scheduler_address):
        # A fit inside a Dask task (dask-ml's HyperbandSearchCV calls partial_fit
        # in tasks): submit through the worker's client, and leave the worker's
        # thread pool while the rounds run, so that a single-threaded worker can
        # run them instead of waiting for this task (a deadlock).
        with worker_client() as client:
            yield client, False
        return
    if scheduler_address is not None:
        client = Client(scheduler_address, set_as_default=False)
        try:
            yield client, False
        finally:
            client.close()
        return
    try:
        client = Client.current(allow_global=True)
    except ValueError:
        client = None
    if client is not None:
        yield client, False
        return
    cluster = embedded_cluster()
    client = Client(cluster, set_as_default=False)
    logger.info("daskdist started a local cluster; dashboard at %s", client.dashboard_link)
    try:
        yield client, True
    finally:
        client.close()
        cluster.close()


def _in_task(scheduler_address: str | None) -> bool:
    """Whether this thread runs a task of the cluster at ``scheduler_address`` (any if None)."""
    from distributed.worker import get_worker, thread_state

    if getattr(thread_state, "key", None) is None:
        return False
    try:
        worker = get_worker()
    except ValueError:
        return False
    return scheduler_address is None or scheduler_address == worker.scheduler.address


_held: contextvars.ContextVar = contextvars.ContextVar("daskdist_held_cluster", default=None)


@contextlib.contextmanager
def held_cluster(scheduler_address: str | None = None, *, daemon: bool = True):
    """Keep one cluster for everything inside: :func:`cluster_client` calls get its client.

    For a fit that asks the cluster something before it trains (the
    samples of a ``Dataset`` read on the workers), so that an embedded
    cluster starts once.

    Parameters
    ----------
    scheduler_address : str, optional
        As in :func:`cluster_client`.
    daemon : bool
        Whether an embedded cluster's worker processes are daemonic; False
        lets them start processes of their own (a DataLoader's workers).
    """
    if _held.get() is not None:
        yield
        return
    settings = {} if daemon else {"distributed.worker.daemon": False}
    with dask.config.set(settings), cluster_client(scheduler_address) as (client, _):
        token = _held.set((scheduler_address, client))
        try:
            yield
        finally:
            _held.reset(token)
