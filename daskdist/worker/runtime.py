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
  worker keeps the two newest states of each replica of a fit.
"""

from __future__ import annotations

import threading

__all__ = ["worker_address", "set_lr", "on_drop_run",
           "drop_run", "keep", "kept", "kept_items", "kept_index", "kept_state", "forget_from",
           "GLOBAL"]

#: Functions ``fn(run_id)`` that free what a worker keeps of a fit.
_droppers: list = []

#: The replica slot of states every replica shares (an average, an applied update).
GLOBAL = -1
#: Rounds kept per (fit, replica).
_KEEP = 2
_store: dict = {}  # (run_id, replica) -> {round: value}
_store_lock = threading.Lock()


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
    return value


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
