"""What a worker process keeps for the fits it runs, and small helpers of its tasks.

- :func:`worker_address` and :func:`set_lr`: helpers every task body uses.
- The run registry: modules that keep per-fit caches on a worker (replicas,
  error-feedback memory, pipeline stages, chunk streams, the process group)
  register a function with :func:`on_drop_run`; :func:`drop_run` (run by the
  driver on every worker when a fit ends) calls them all.
- The state store: round tasks keep the training state they start from or
  make (:func:`keep`) in the worker's memory, apart from Dask's. Dask may
  drop a key's copy from the worker that made it (its active memory manager
  keeps one copy of data held twice), spill it, or forget a held state whose
  lineage reaches scattered data that was lost; a task then finds its own
  state again here (:func:`kept`), and the driver recovers from the newest
  state a live worker keeps (:func:`kept_index`, :func:`kept_state`). Each
  worker keeps the two newest states of each replica of a fit. A task may
  also wait for what an earlier task of the same worker will keep
  (:func:`await_kept`), an input Dask does not know about.
"""

from __future__ import annotations

import threading
import time

__all__ = ["worker_address", "set_lr", "on_drop_run",
           "drop_run", "keep", "kept", "kept_items", "kept_index", "kept_state", "forget_from",
           "await_kept", "waits_seen", "GLOBAL"]

#: Functions ``fn(run_id)`` that free what a worker keeps of a fit.
_droppers: list = []

#: The replica slot of states every replica shares (an average, an applied update).
GLOBAL = -1
#: Rounds kept per (fit, replica).
_KEEP = 2
_store: dict = {}  # (run_id, replica) -> {round: value}
_store_lock = threading.Lock()
_store_changed = threading.Condition(_store_lock)
_changes = [0]  # values kept so far (what a waiter has seen)
_waits = [0]  # times a task waited for its predecessor (await_kept)
#: Seconds :func:`await_kept` waits for a task its worker does not know (yet).
UNKNOWN_TASK_GRACE = 5.0
#: States of a task that will still run on its worker.
_PENDING = frozenset({"waiting", "fetch", "flight", "ready", "constrained", "executing",
                      "long-running", "resumed"})


def worker_address() -> str | None:
    """This worker's address; None outside a worker."""
    try:
        from distributed import get_worker

        return get_worker().address
    except ValueError:
        return None


def set_lr(optimizer, lr) -> None:
    """Set each parameter group's learning rate (``lr``: one for all, or one per group)."""
    groups = optimizer.param_groups
    lrs = lr if isinstance(lr, (tuple, list)) else [lr] * len(groups)
    for group, value in zip(groups, lrs):
        group["lr"] = value


def on_drop_run(fn):
    """Register ``fn(run_id)``, called when a fit ends; returns ``fn`` (a decorator)."""
    if fn not in _droppers:
        _droppers.append(fn)
    return fn


def drop_run(run_id: str) -> None:
    """Free everything this worker keeps of a finished fit."""
    forget_from(run_id, None)
    for fn in _droppers:
        fn(run_id)


def keep(run_id: str, replica: int, round: int, value):
    """Keep ``value`` (a state, or a round result holding one) as ``replica``'s at ``round``.

    ``replica`` is :data:`GLOBAL` for a state all replicas share. Only the
    two newest rounds of each replica stay. Returns ``value``.
    """
    with _store_lock:
        rounds = _store.setdefault((run_id, replica), {})
        rounds[round] = value
        for old in sorted(rounds)[:-_KEEP]:
            del rounds[old]
        _changes[0] += 1
        _store_changed.notify_all()
    return value


def await_kept(run_id: str, replica: int, round: int, key, matches) -> object:
    """What task ``key`` keeps for ``replica`` at ``round`` on this worker, waiting for it.

    For a task whose input is kept by an earlier task of the same worker
    (its predecessor ``key``) rather than passed by Dask, so that Dask can
    send it to the worker before the predecessor ends. Returns the kept
    value once ``matches(value)``; while the predecessor is queued or
    running here, waits, seceded from the worker's thread pool so that the
    predecessor can run. Returns None when the predecessor will not keep it
    here (it is unknown to this worker for :data:`UNKNOWN_TASK_GRACE`
    seconds, finished without it, or failed).
    """
    from distributed import get_worker, rejoin, secede

    tasks = get_worker().state.tasks
    seceded, unknown_since = False, None
    try:
        while True:
            with _store_lock:
                value = _store.get((run_id, replica), {}).get(round)
                seen = _changes[0]
            if value is not None and matches(value):
                return value
            ts = tasks.get(key)
            state = None if ts is None else ts.state
            if state is None:
                unknown_since = unknown_since or time.monotonic()
                if time.monotonic() - unknown_since > UNKNOWN_TASK_GRACE:
                    return None
            elif state not in _PENDING:  # finished, failed or released without it
                return None
            if not seceded:
                secede()  # the predecessor may need this worker's thread
                seceded = True
                _waits[0] += 1
            with _store_changed:
                if _changes[0] == seen:
                    _store_changed.wait(0.05)
    finally:
        if seceded:
            rejoin()


def waits_seen() -> int:
    """Times a task on this worker process waited for its predecessor (:func:`await_kept`)."""
    return _waits[0]


def kept(run_id: str, replica: int, round: int):
    """What :func:`keep` holds for ``replica`` at ``round``, or None."""
    with _store_lock:
        return _store.get((run_id, replica), {}).get(round)


def kept_items(run_id: str, round: int) -> list:
    """``(replica, value)`` of every value this worker keeps of a fit at ``round``."""
    with _store_lock:
        return [(replica, rounds[round]) for (run, replica), rounds in _store.items()
                if run == run_id and round in rounds]


def kept_index(run_id: str) -> list[tuple[int, int]]:
    """``(round, replica)`` of every state this worker keeps of a fit (run on workers)."""
    with _store_lock:
        return sorted((r, replica) for (run, replica), rounds in _store.items()
                      if run == run_id for r in rounds)


def kept_state(run_id: str, round: int, replica: int):
    """The training state kept for ``replica`` at ``round`` (run on a worker), or None."""
    value = kept(run_id, replica, round)
    return getattr(value, "state", value)


def forget_from(run_id: str, round: int | None) -> None:
    """Forget a fit's states from ``round`` on (None: all); an attempt was given up."""
    with _store_lock:
        for (run, replica) in list(_store):
            if run != run_id:
                continue
            rounds = _store[(run, replica)]
            for r in [r for r in rounds if round is None or r >= round]:
                del rounds[r]
            if not rounds:
                del _store[(run, replica)]
