"""The one place daskdist relies on ``distributed`` internals (and works around dask-ml).

dask-ml's incremental searches get their own module,
:mod:`daskdist._compat.incremental_search`. The rest is here:

``tests/test_dashboard.py`` checks each of them against the installed
version (``tests/test_faults.py`` the last one), so that a change in
``distributed`` fails there, loudly, rather than somewhere in a fit:

- the scheduler's web application (:func:`add_http_routes`), to serve the
  ``/daskdist`` page on a scheduler that is already running;
- the scheduler's task states (:func:`who_has`, :func:`task_state`, run on
  the scheduler with ``Client.run_on_scheduler``), to place shards where their
  chunks are held and to tell a lost round output from one on its way;
- the scheduler's ``identity`` call (:func:`workers`), because
  ``Client.scheduler_info()`` returns a cache that the client's periodic
  refresh, which carries no per-worker information, can overwrite between
  the fetch and the read (a fit then sees no workers);
- the scheduler's ``no-worker`` tasks (:func:`reschedule_stranded`): a task
  placed on a worker with ``allow_other_workers=True`` that has to be
  recomputed at a moment when no worker is running waits in ``no-worker`` for
  ever, because the scheduler only reconsiders such tasks for a new worker
  that its (dead) worker restrictions name;
- ``SpecCluster``'s handling of a lost worker (:class:`KeepRestartingNannies`),
  which closes a nanny for good while it is bringing its worker back.
"""

from __future__ import annotations

import asyncio
from collections import Counter

import dask
from dask.utils import parse_timedelta
from distributed.core import Status
from distributed.deploy.cluster import Cluster

__all__ = ["KeepRestartingNannies", "add_http_routes", "http_routes_added", "reschedule_stranded",
           "task_state", "who_has", "workers"]


def workers(client) -> dict:
    """The cluster's workers, address -> the scheduler's information on it, fetched now."""
    return dict(client.sync(client.scheduler.identity, n_workers=-1)["workers"])


def who_has(keys, dask_scheduler=None) -> list[list[str]]:
    """For each key, the addresses of the workers holding it in memory (on the scheduler)."""
    tasks = dask_scheduler.tasks
    return [sorted(ws.address for ws in tasks[k].who_has) if k in tasks and tasks[k].who_has
            else [] for k in keys]


def task_state(key, dask_scheduler=None) -> str | None:
    """The scheduler's state of ``key`` (on the scheduler); ``None`` if it forgot the key."""
    task = dask_scheduler.tasks.get(key)
    return None if task is None else task.state


def reschedule_stranded(prefix: str, dask_scheduler=None) -> list:
    """Schedule the stranded tasks that keys containing ``prefix`` wait for (on the scheduler).

    A ``no-worker`` task is stranded when it may run on other workers than
    those it was placed on (loose restrictions), none of those is in the
    cluster any more, and workers are running: the scheduler would leave it
    waiting for a worker that never comes back. The tasks looked at are those
    of the keys containing ``prefix`` and everything they wait on (the source
    chunks of a dask input, for instance). Returns the keys rescheduled.
    """
    import time

    scheduler = dask_scheduler
    if not (scheduler.unrunnable and scheduler.running):
        return []
    todo = [ts for key, ts in scheduler.tasks.items()
            if prefix in str(key) and ts.state in ("waiting", "no-worker")]
    seen, stranded = set(), []
    while todo:
        ts = todo.pop()
        if ts.key in seen:
            continue
        seen.add(ts.key)
        if ts.state == "no-worker":
            if ts.loose_restrictions and not scheduler.valid_workers(ts):
                stranded.append(ts.key)
        elif ts.state == "waiting":
            todo.extend(ts.waiting_on or ())
    if stranded:
        scheduler.transitions({key: "processing" for key in stranded},
                              stimulus_id=f"daskdist-reschedule-{time.time()}")
    return [str(key) for key in stranded]


def add_http_routes(scheduler, routes) -> None:
    """Add ``(pattern, handler, kwargs)`` routes to a running scheduler's web server.

    ``routes`` are given like the modules named in the documented setting
    ``distributed.scheduler.http.routes`` give theirs; handlers that take
    ``dask_server`` get the scheduler, and patterns get the scheduler's
    ``http_prefix``. Uses the scheduler's ``http_application`` (a tornado
    application), which the documented setting fills at start-up only. Routes
    already added (by that setting, or by an earlier call) are left alone.
    """
    import inspect

    application = getattr(scheduler, "http_application", None)
    if application is None:
        raise RuntimeError("The scheduler has no web server (distributed internals changed, "
                           "or it was started without one): the /daskdist page is not served.")
    if http_routes_added(scheduler, routes):
        return
    prefix = "/" + (getattr(scheduler, "http_prefix", None) or "").strip("/")
    handlers = []
    for pattern, handler, kwargs in routes:
        if "dask_server" in inspect.signature(handler.initialize).parameters:
            kwargs = {**kwargs, "dask_server": scheduler}
        handlers.append((prefix.rstrip("/") + "/" + pattern.lstrip("/"), handler, kwargs))
    application.add_handlers(r".*", handlers)


def http_routes_added(scheduler, routes) -> bool:
    """Whether the scheduler's web server already serves the first of ``routes``."""
    from tornado.httputil import HTTPHeaders, HTTPServerRequest, RequestStartLine

    application = scheduler.http_application
    prefix = "/" + (getattr(scheduler, "http_prefix", None) or "").strip("/")
    path = prefix.rstrip("/") + "/" + routes[0][0].lstrip("/")
    request = HTTPServerRequest(start_line=RequestStartLine("GET", path, "HTTP/1.1"),
                                headers=HTTPHeaders({"Host": "localhost"}))
    handler = application.find_handler(request)
    return handler.handler_class is routes[0][1]


class KeepRestartingNannies:
    """Mixin for a ``LocalCluster``: a nanny bringing its worker back is not closed.

    ``SpecCluster`` closes, for good, the nanny of a worker that left the
    scheduler once ``distributed.deploy.lost-worker-timeout`` (15 s) has
    passed with no worker of the same name registered. It only looks at that
    moment, so a worker that dies, comes back and dies again within the
    timeout loses its nanny in the middle of the second restart (and a
    restart slower than the timeout loses it too): the cluster is a worker
    short for the rest of its life. With this mixin a removal's timer does
    nothing if a worker of that name registered since, and waits another
    timeout while the nanny is still restarting its worker; a nanny whose
    worker is gone for good (it failed to start, or hangs unheard from) is
    closed as before.
    """

    def _update_worker_status(self, op, msg):
        registrations = self.__dict__.setdefault("_daskdist_registrations", Counter())
        if op == "add":
            for info in msg.get("workers", {}).values():
                registrations[info.get("name")] += 1
            return super()._update_worker_status(op, msg)
        if op != "remove" or msg not in self.scheduler_info["workers"]:
            return super()._update_worker_status(op, msg)
        name = self.scheduler_info["workers"][msg]["name"]
        delay = parse_timedelta(dask.config.get("distributed.deploy.lost-worker-timeout"))
        asyncio.get_running_loop().call_later(delay, self._close_lost_nanny, name,
                                              registrations[name], delay)
        # the bookkeeping only: SpecCluster's own timer is the one replaced above
        return Cluster._update_worker_status(self, op, msg)

    def _close_lost_nanny(self, name, registrations: int, delay: float) -> None:
        nanny = self.workers.get(name)
        if (nanny is None or self._daskdist_registrations[name] > registrations
                or any(info["name"] == name for info in self.scheduler_info["workers"].values())):
            return
        process = getattr(nanny, "process", None)
        if nanny.status == Status.running and (process is None or process.status in (
                Status.init, Status.starting, Status.stopped)):
            asyncio.get_running_loop().call_later(delay, self._close_lost_nanny, name,
                                                  registrations, delay)
            return
        self._futures.add(asyncio.ensure_future(nanny.close()))
        del self.workers[name]
