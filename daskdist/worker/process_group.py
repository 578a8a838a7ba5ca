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

A process has one default group, so a worker process belongs to one group at
a time; the group stays formed between a fit's epochs (joining again with the
same spec costs nothing) and is destroyed when its fit ends
(:func:`leave`) or when another group replaces it. A group in which a rank
failed is not joined again.

A rank whose worker process dies breaks its peers' connections, and their
collectives fail at once. A rank that fails in the user's code (or hangs)
leaves its peers waiting in their collective until the group's timeout: gloo
offers no way to interrupt a collective in progress, and destroying the
failed rank's group does not close its connections either.
"""

from __future__ import annotations

import datetime
import threading
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..errors import GroupAborted

__all__ = ["GroupSpec", "GroupAborted", "rendezvous", "join", "release", "leave",
           "abort_event", "abort_event_name", "current"]

_lock = threading.Lock()
#: Rendezvous stores served by this process (it holds rank 0), by group key.
_stores: dict = {}
#: The group this process is a member of, or None.
_group = None

#: Seconds between checks of the driver's abort event while waiting for the other ranks.
_ABORT_POLL_S = 0.5


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
    fit is training with it at this moment) and forms this one.
    """
    global _group
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
    store = _stores.get(spec.key) if rank == 0 else None
    if store is None:
        store = dist.TCPStore(spec.host, spec.port, spec.world_size, False,
                              timeout=datetime.timedelta(seconds=spec.timeout))
    _wait_for_ranks(store, spec)
    dist.init_process_group(spec.backend, store=store, rank=rank, world_size=spec.world_size,
                            timeout=datetime.timedelta(seconds=spec.timeout))
    group = _Group(spec, rank, store)
    group.in_use = True
    with _lock:
        _group = group
    return group


def _wait_for_ranks(store, spec: GroupSpec) -> None:
    """Check in at the store and wait for every rank; stop early if the driver aborts."""
    store.add("arrived", 1)
    start = time.monotonic()
    next_check = start + _ABORT_POLL_S
    event = None
    while store.add("arrived", 0) < spec.world_size:
        now = time.monotonic()
        if now - start > spec.timeout:
            raise TimeoutError(
                f"Only {store.add('arrived', 0)} of {spec.world_size} ranks of the ddp process "
                f"group reached the rendezvous at {spec.host}:{spec.port} within "
                f"{spec.timeout:g} s (strategy__timeout)."
            )
        if now >= next_check:
            event = event or abort_event(spec.key)
            if event is not None and event.is_set():
                raise GroupAborted(f"The driver aborted ddp process group {spec.key}.")
            next_check = now + _ABORT_POLL_S
        time.sleep(0.005)


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
