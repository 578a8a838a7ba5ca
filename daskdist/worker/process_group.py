"""A worker's ``torch.distributed`` process group, formed through Dask and kept between epochs.

The ``ddp`` strategy trains with :class:`torch.nn.parallel.DistributedDataParallel`,
whose gradients travel through a ``torch.distributed`` process group (gloo on
CPU, NCCL on GPU) rather than through Dask. Dask forms the group:

1. :func:`rendezvous`, a task on the first rank's worker, starts the group's
   ``TCPStore`` on a port the operating system picks (none is hard-coded) and
   returns it; the driver puts the address, as the scheduler sees that worker,
   in a :class:`GroupSpec`.
2. Every rank's training task calls :func:`join`: it checks in at the store,
   waits for the other ranks (giving up early if the driver aborts the group,
   see :func:`abort_event_name`), and initialises the process's default group.
   The ranks agree through the store on whether the group formed: once one
   rank gives up waiting, a rank that arrives later gives up at once rather
   than waiting for a peer that left.

A process has one default group, so a worker process belongs to one group at
a time; the group stays formed between a fit's epochs (joining again with the
same spec costs nothing) and is destroyed when its fit ends
(:func:`leave`) or when another group replaces it. A group in which a rank
failed is not joined again.

A rank whose worker process dies breaks its peers' connections, and their
collectives fail at once. A rank that fails in the user's code (or hangs),
or fails because another peer's connection broke, leaves its peers waiting in
their collective until the group's timeout: gloo offers no way to interrupt a
collective in progress, and destroying the failed rank's group does not close
its connections either (``DistributedDataParallel`` leaves references to the
process group behind). The driver therefore waits for the ranks of a group
it gave up to end before it forms the next one.
"""

from __future__ import annotations

import datetime
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..errors import GroupAborted
from .runtime import on_drop_run

__all__ = ["GroupSpec", "GroupAborted", "is_communication_error", "process_identity",
           "rendezvous", "join", "release", "leave",
           "abort_event", "abort_event_name", "current"]

_lock = threading.Lock()
#: A random id of this process (see :func:`process_identity`).
_PROCESS_ID = uuid.uuid4().hex
#: Rendezvous stores served by this process (it holds rank 0), by group key.
_stores: dict = {}
#: The group this process is a member of, or None.
_group = None

#: Seconds between checks of the driver's abort event while waiting for the other ranks.
_ABORT_POLL_S = 0.5
#: Seconds of one attempt to connect to the rendezvous store (the abort event is checked
#: between attempts).
_CONNECT_S = 2.0


@dataclass(frozen=True)
class GroupSpec:
    """Where and how the ranks of one group meet.

    Attributes
    ----------
    key : str
        Identifies the group: the fit's run id, its recovery generation and
        its members.
    run_id : str
        The fit the group trains.
    host : str
        Address of the rendezvous store (the first rank's worker, as the
        scheduler sees it).
    port : int
        Port of the rendezvous store.
    world_size : int
        Ranks in the group.
    backend : {"gloo", "nccl"}
        The ``torch.distributed`` backend.
    timeout : float
        Seconds a rendezvous or a collective may take before it fails.
    members : tuple of str
        The workers of the ranks, in rank order.
    """

    key: str
    run_id: str
    host: str
    port: int
    world_size: int
    backend: str
    timeout: float
    members: tuple = ()


class _Group:
    """This process's membership of a group, and what it keeps between epochs."""

    def __init__(self, spec: GroupSpec, rank: int, store):
        self.spec, self.rank, self.store = spec, rank, store
        self.in_use = False
        self.broken = False  # a rank failed: the group is not used again
        self.left = False  # its fit ended while a task used it: destroy it after the task
        self.wrapped = None  # (module, options, DistributedDataParallel) of the last epoch

    def wrap(self, module, device, **options):
        """``DistributedDataParallel(module, **options)``, built again only when needed.

        Building one is a collective, so the ranks decide together: a rank
        whose module is new (its worker rebuilt the replica, for instance
        after Dask moved the model spec away and back) makes every rank
        build it again.
        """
        fresh = self.wrapped is None or self.wrapped[0] is not module \
            or self.wrapped[1] != options
        flag = torch.tensor([float(fresh)], device=device)
        dist.all_reduce(flag)
        if not flag.item():
            return self.wrapped[2]
        self.wrapped = None
        ddp = torch.nn.parallel.DistributedDataParallel(module, **options)
        self.wrapped = (module, options, ddp)
        return ddp


def abort_event_name(key: str) -> str:
    """Name of the :class:`distributed.Event` the driver sets to abort group ``key``."""
    return f"daskdist-ddp-abort-{key}"


def rendezvous(key: str, host: str, world_size: int, timeout: float) -> int:
    """Start group ``key``'s rendezvous store in this process; return its port.

    The ``daskdist-rendezvous`` task, run on the first rank's worker. The
    store lives as long as the group does (or until :func:`leave`).
    """
    store = dist.TCPStore(host, 0, world_size, True,
                          timeout=datetime.timedelta(seconds=timeout), wait_for_workers=False)
    with _lock:
        _stores[key] = store
    return store.port


def join(spec: GroupSpec, rank: int) -> _Group:
    """Make this process rank ``rank`` of the group ``spec``; return its membership.

    Reuses the group formed by an earlier epoch when it is the same one.
    Otherwise destroys the process's previous group (refusing to if another
    fit is training with it at this moment) and forms this one. Raises
    :class:`GroupAborted` if the driver gave the group up, or another rank
    gave up waiting for this one; ``TimeoutError`` if the other ranks do not
    all arrive within the group's timeout.
    """
    global _group
    _check_not_aborted(spec)
    with _lock:
        old = _group
        if old is not None and old.spec == spec and old.rank == rank and not old.broken:
            old.in_use = True
            return old
        if old is not None and old.in_use:
            raise RuntimeError(
                f"This worker is training another ddp fit (run {old.spec.run_id}); a worker "
                "process can belong to one torch.distributed group at a time, so ddp fits on "
                "one cluster must run one after the other."
            )
        _group = None
    _destroy(old)
    deadline = time.monotonic() + spec.timeout
    store = _stores.get(spec.key) if rank == 0 else None
    if store is None:
        store = _connect(spec, deadline)
    _wait_for_ranks(store, spec, deadline)
    dist.init_process_group(spec.backend, store=store, rank=rank, world_size=spec.world_size,
                            timeout=datetime.timedelta(seconds=spec.timeout))
    group = _Group(spec, rank, store)
    group.in_use = True
    with _lock:
        _group = group
    return group


def _check_not_aborted(spec: GroupSpec) -> None:
    """Raise :class:`GroupAborted` if the driver gave the group up (a task that started late)."""
    event = abort_event(spec.key)
    if event is not None and event.is_set():
        raise GroupAborted(f"The driver aborted ddp process group {spec.key}.")


def _connect(spec: GroupSpec, deadline: float):
    """A client of the group's rendezvous store, connected before ``deadline``.

    Connects in short attempts, checking the driver's abort event between
    them: the store lives in the first rank's worker, and if that worker
    died, one long attempt would hold this worker until the timeout (and
    longer: the store client retries).
    """
    event = None
    while True:
        left = deadline - time.monotonic()
        try:
            store = dist.TCPStore(spec.host, spec.port, spec.world_size, False,
                                  timeout=datetime.timedelta(seconds=max(min(_CONNECT_S, left),
                                                                         0.1)))
        except (RuntimeError, TimeoutError, ConnectionError) as error:
            if time.monotonic() >= deadline:
                raise TimeoutError(
                    f"Could not reach the ddp rendezvous store at {spec.host}:{spec.port} "
                    f"within {spec.timeout:g} s (strategy__timeout): {error}") from None
            event = event or abort_event(spec.key)
            if event is not None and event.is_set():
                raise GroupAborted(f"The driver aborted ddp process group {spec.key}.") from None
            continue
        store.set_timeout(datetime.timedelta(seconds=spec.timeout))
        return store


#: The store key on which the ranks agree whether the group formed: "yes", or "no" once a
#: rank gave up waiting (whichever is set first stays).
_FORMED = "formed"


def _wait_for_ranks(store, spec: GroupSpec, deadline: float) -> None:
    """Check in at the store and wait for every rank; stop early if the driver aborts.

    The last rank to arrive declares the group formed; a rank that gives up
    (timeout, or the driver's abort) declares it failed. The first
    declaration wins, so every rank either goes on to form the group or
    gives up: none is left in ``init_process_group`` waiting for a rank that
    left, and one that arrives after another gave up leaves at once.
    """
    if store.add("arrived", 1) >= spec.world_size:
        store.compare_set(_FORMED, "", "yes")
    next_check = time.monotonic() + _ABORT_POLL_S
    event = None
    while not store.check([_FORMED]):
        now = time.monotonic()
        reason = None
        if now > deadline:
            reason = TimeoutError(
                f"Only {store.add('arrived', 0)} of {spec.world_size} ranks of the ddp process "
                f"group reached the rendezvous at {spec.host}:{spec.port} within "
                f"{spec.timeout:g} s (strategy__timeout)."
            )
        elif now >= next_check:
            event = event or abort_event(spec.key)
            if event is not None and event.is_set():
                reason = GroupAborted(f"The driver aborted ddp process group {spec.key}.")
            next_check = now + _ABORT_POLL_S
        if reason is not None and store.compare_set(_FORMED, "", "no") != b"yes":
            raise reason
        time.sleep(0.005)
    if store.get(_FORMED) != b"yes":
        raise GroupAborted(f"Another rank gave up forming ddp process group {spec.key}.")


def abort_event(key: str):
    """The :class:`distributed.Event` that aborts group ``key`` (None outside a Dask task)."""
    try:
        from distributed import Event, get_client

        return Event(abort_event_name(key), client=get_client())
    except ValueError:  # not in a Dask task
        return None


def release(group: _Group) -> None:
    """The epoch's task is done with the group (another fit may now take the process).

    Destroys it now if it was left while the task trained with it.
    """
    global _group
    with _lock:
        group.in_use = False
        destroy = group.left and _group is group
        if destroy:
            _group = None
    if destroy:
        _destroy(group)


def current() -> GroupSpec | None:
    """The spec of the group this process belongs to, if any."""
    group = _group
    return None if group is None else group.spec


def process_identity() -> tuple:
    """What identifies this worker process across the cluster: its host, pid and a random id.

    The pid alone does not: containers on different hosts commonly run their
    workers as pid 7. Two workers in one process (``processes=False``) share
    all three.
    """
    return (socket.gethostname(), os.getpid(), _PROCESS_ID)


@on_drop_run
def leave(run_id: str | None = None, key: str | None = None) -> bool:
    """Destroy this process's group if it belongs to ``run_id`` (or is ``key``; None: any).

    Also drops the matching rendezvous stores this process serves. A group
    that a training task is using (an interrupted fit's epoch, still running)
    is destroyed when that task ends. Returns whether the group was left.
    """
    global _group
    doomed = None
    with _lock:
        old = _group
        match = old is not None and (run_id is None or old.spec.run_id == run_id) \
            and (key is None or old.spec.key == key)
        if match and old.in_use:
            old.left = True  # release() destroys it when its task ends
        elif match:
            _group, doomed = None, old
        for k in [k for k in _stores if (run_id is None or k.startswith(f"{run_id}-"))
                  and (key is None or k == key)]:
            del _stores[k]
    _destroy(doomed)
    return match


def _destroy(group: _Group | None) -> None:
    if group is None:
        return
    group.wrapped = None
    if dist.is_initialized():
        dist.destroy_process_group()


def is_communication_error(error) -> bool:
    """Whether a rank failed because the group broke (rather than in the user's code)."""
    if isinstance(error, (GroupAborted, TimeoutError, ConnectionError)):
        return True
    dist_error = getattr(torch.distributed, "DistError", ())
    if dist_error and isinstance(error, dist_error):
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and any(
        marker in text for marker in ("gloo", "Gloo", "NCCL", "Connection reset",
                                      "Connection closed", "Broken pipe"))
