"""What a replica (or a group of replicas) keeps of its own from one round to the next.

Most of the training state is shared: every replica of ``sync`` or
``local_sgd`` continues from the same parameters. Some of it belongs to one
replica, and the next round depends on it all the same:

- ``"residual"``: ``topk`` compression's error-feedback memory, what the
  replica (or, under ``hierarchical``, its group) has not sent yet;
- ``"optimizer"``: the replica's own optimizer state, where replicas keep
  their own (compressed ``local_sgd`` and ``hierarchical``);
- ``"scaler"``: the replica's fp16 loss scaler (``precision="fp16"``).

A round task reads its owner's *part* (a dict of those entries) with
:func:`part_for` and keeps the part it leaves with :func:`keep_part`, in
the worker's memory, keyed by round: a round computed again (after a lost
worker, or because Dask recomputed it) reads the same part again, never one
consumed or overwritten by its first run. At the end of an epoch the parts
are gathered into the training state (``TrainingState.own``), so that they
travel with it into checkpoints and the next epoch, which reads them from
there.
"""

from __future__ import annotations

import threading
from dataclasses import replace

from .runtime import on_drop_run

__all__ = ["replica_owner", "group_owner", "part_for", "latest_part", "keep_part", "parts_at",
           "gather_parts", "is_empty", "drop_parts"]

#: Rounds kept per (fit, owner): a round computed again finds its predecessor's part.
_KEEP = 3
_parts: dict = {}  # (run_id, owner) -> {round: part}
_lock = threading.Lock()


def replica_owner(replica: int) -> str:
    """The owner name of a replica's part."""
    return f"replica {replica}"


def group_owner(group: int) -> str:
    """The owner name of a group's part (``hierarchical``)."""
    return f"group {group}"


def part_for(run_id: str, owner: str, round: int, state=None) -> dict:
    """The part ``owner`` starts round ``round`` with.

    From ``state.own`` when the state carries it (an epoch's starting state, a
    state recovered after a lost worker, a resumed checkpoint), else the part
    this worker kept after round ``round - 1``, else an empty part (the fit's
    first round). Returns a new dict: the caller may change it.
    """
    if state is not None and owner in state.own:
        return dict(state.own[owner])
    with _lock:
        found = _parts.get((run_id, owner), {}).get(round - 1)
    return dict(found) if found is not None else {}


def latest_part(run_id: str, owner: str) -> dict:
    """The newest part this worker keeps for ``owner`` (strategies where arrival order rules)."""
    with _lock:
        rounds = _parts.get((run_id, owner), {})
        return dict(rounds[max(rounds)]) if rounds else {}


def keep_part(run_id: str, owner: str, round: int, part: dict) -> dict:
    """Keep the part ``owner`` leaves after round ``round``; returns ``part``."""
    with _lock:
        rounds = _parts.setdefault((run_id, owner), {})
        # rounds computed again from an earlier state (a recovery) replace what the attempt
        # given up left: nothing after this round is current any more
        for old in [r for r in rounds if not round - _KEEP < r <= round]:
            del rounds[old]
        rounds[round] = part
    return part


def parts_at(run_id: str, round: int, owners=None) -> dict:
    """The parts this worker keeps after ``round``, by owner (run on a worker by the driver)."""
    with _lock:
        return {owner: dict(rounds[round]) for (run, owner), rounds in _parts.items()
                if run == run_id and round in rounds and (owners is None or owner in owners)}


def gather_parts(final, *parts: dict):
    """``final`` (a training state) carrying the parts of every owner (an epoch's end).

    ``parts`` are dicts of owner to part, one per worker (:func:`parts_at`).
    Parts that hold nothing are left out, so a strategy whose replicas keep
    nothing of their own ends its epochs with ``own == {}``.
    """
    own = {}
    for found in parts:
        own.update({owner: part for owner, part in found.items() if not is_empty(part)})
    return replace(final, own=dict(sorted(own.items())))


def is_empty(part: dict) -> bool:
    """Whether a part holds nothing the next round depends on.

    No residual; no optimizer state of its own (an optimizer without
    per-parameter state, plain SGD, is the shared state's); a loss scaler at
    its initial scale that has not counted a step (a fresh scaler).
    """
    if part.get("residual") is not None:
        return False
    optimizer = part.get("optimizer")
    if optimizer and optimizer.get("state"):
        return False
    scaler = part.get("scaler")
    return not scaler or (scaler.get("_growth_tracker", 0) == 0
                          and scaler.get("scale") == scaler.get("init_scale", 2.0 ** 16))


@on_drop_run
def drop_parts(run_id: str) -> None:
    """Forget the parts of a finished fit."""
    with _lock:
        for key in [k for k in _parts if k[0] == run_id]:
            del _parts[key]
