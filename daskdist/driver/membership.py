"""Replicas that follow the cluster's workers: joins and departures.

Before each epoch, and between two rounds where the strategy allows it
(:func:`resizes_mid_epoch`, :func:`watch`, :func:`pause`), the driver
compares its replicas' workers with the cluster's (:func:`follow_workers`):

- **a worker joined** (``cluster.scale``, adaptive scaling, a batch job that
  started late): a fit whose replica count follows the workers (no
  ``n_replicas`` given) adds replicas on the new workers, up to
  ``max_replicas``; a fit with a fixed count moves replicas doubled up on one
  worker (after a loss) onto the new ones;
- **a worker left gracefully** (``retire_workers``, adaptive scale-down): its
  shard was moved by Dask and its replica doubled up on a survivor; a
  following fit merges that replica's rows into the others, a fixed one
  moves the replica to the least loaded worker;
- **a worker died**: recovery (:mod:`.recovery`) moved its replica onto a
  survivor; the replica count stays (so that the fit stays exactly the one a
  fault-free fit would have been), and the replica moves to a worker that
  joins later (its nanny's restart, say).

The new shards are built on the workers from the old ones, moving only the
rows (or, for streamed shards, the chunk readers) that must move
(:mod:`.reshard`); the training state stays
where it is (new replicas fetch it from a peer's worker); nothing is rolled
back. What each replica keeps of its own (:mod:`daskdist.worker.own_state`)
follows its replica: a leaving replica's unsent ``topk`` residual is added to
the replica that takes most of its rows, a new replica starts with an empty
part. The global batch stays ``batch_size``, split over the replicas there
are, so a step's update (and ``sync``'s equivalence with single-process SGD
on the global batch) does not depend on how many replicas there are.
"""

from __future__ import annotations

import logging
import time

import numpy as np

from ..torch_warmup import is_warm
from . import recovery, reshard

__all__ = ["follow_workers", "watch", "pause", "resizes_mid_epoch", "epoch_steps",
           "MembersChanged", "plan_placement", "check_params", "left_gracefully"]

logger = logging.getLogger(__name__)


def check_params(elastic, max_replicas) -> None:
    """Raise ``ValueError`` naming ``elastic`` or ``max_replicas`` when not valid."""
    if not isinstance(elastic, (bool, np.bool_)):
        raise ValueError(f"elastic={elastic!r}: expected True or False")
    if max_replicas is not None and not (
            isinstance(max_replicas, (int, np.integer)) and not isinstance(max_replicas, bool)
            and max_replicas >= 1):
        raise ValueError(f"max_replicas={max_replicas!r}: expected an integer >= 1, or None")


def plan_placement(current: list[str], live: list[str], n: int):
    """Which replicas continue, and where each of ``n`` replicas trains.

    Returns ``(keep, workers)``: for each new replica the old replica it
    continues (None: a new one), and its worker. Replicas stay on their
    worker while it is live and not over its share (``ceil(n / workers)``);
    the others, and new replicas, go to the least loaded live workers.
    """
    if not live:
        raise ValueError("no live workers to place replicas on")
    alive = [i for i, w in enumerate(current) if w in live]
    order = alive + [i for i in range(len(current)) if i not in alive]
    # of replicas that share a worker, the first on it continues first
    seen, first, rest = set(), [], []
    for i in order:
        (rest if current[i] in seen else first).append(i)
        seen.add(current[i])
    keep = sorted((first + rest)[:n]) + [None] * max(n - len(current), 0)
    cap = -(-n // len(live))
    load = dict.fromkeys(live, 0)
    workers: list = [None] * n
    for j, old in enumerate(keep):
        if old is not None and current[old] in load and load[current[old]] < cap:
            workers[j] = current[old]
            load[current[old]] += 1
    for j in range(n):
        if workers[j] is None:
            workers[j] = min(live, key=lambda w: (load[w], live.index(w)))
            load[workers[j]] += 1
    return keep, workers


def left_gracefully(client, address: str, known: dict) -> bool:
    """Whether the worker ``address`` was removed as planned (retired, scaled down).

    The scheduler's ``remove-worker`` event says (``expected``); a worker that
    died or stopped answering was not. ``known`` caches the answers.
    """
    if address not in known:
        try:
            events = client.get_events(address)
        except Exception:  # noqa: BLE001 - an old or unreachable scheduler: assume not
            events = ()
        removals = [msg for _, msg in events
                    if isinstance(msg, dict) and msg.get("action") == "remove-worker"]
        known[address] = bool(removals) and bool(removals[-1].get("expected"))
    return known[address]


def _target(trainer, live: list[str]) -> int:
    if not trainer.resize:
        return len(trainer.replica_workers)
    n = trainer.strategy.replicas_for(len(live))
    if trainer.max_replicas is not None:
        n = min(n, trainer.max_replicas)
    return max(1, min(n, sum(trainer.shard_sizes)))


class MembersChanged(Exception):
    """Raised in an epoch's round loop when the driver takes in workers that joined or left."""


#: Seconds between two looks at the cluster's workers while an epoch runs.
WATCH_INTERVAL = 0.2


def resizes_mid_epoch(trainer) -> bool:
    """Whether ``trainer``'s replica count may change between two rounds of an epoch.

    It may where the count follows the workers, the strategy's round loop
    can stop after any round (:meth:`Strategy.resizes_mid_epoch`), replicas
    keep nothing of their own (no fp16 loss scalers, no parts in the state),
    and the shards are in memory (a mid-epoch shard carries the rows its
    epoch has left). Elsewhere changes wait for the epoch's end.
    """
    return (trainer.elastic and trainer.resize and trainer.strategy.resizes_mid_epoch()
            and trainer.strategy.elastic_refusal() is None
            and trainer.spec.precision != "fp16" and not trainer._epoch_state.own
            and not trainer.shard_set.streaming
            and trainer.shard_set.source.resize_refusal is None)


def epoch_steps(trainer) -> int:
    """Optimizer steps of ``trainer``'s current epoch (more after a mid-epoch change)."""
    if trainer.epoch_steps is not None and trainer.epoch_steps[0] == trainer.epoch:
        return trainer.epoch_steps[1]
    return trainer.steps_per_epoch


def watch(trainer) -> None:
    """After a settled round: raise :class:`MembersChanged` when the replicas should change.

    Looks at the workers at most every :data:`WATCH_INTERVAL` seconds, and
    plans only when they differ from the last look. Only changes of the
    replica count are taken mid-epoch (a replica that merely moves waits for
    the epoch's end), none while a replica's worker died (recovery's), and
    joining workers once they are past their start-up (torch's import), so
    that the replicas train on meanwhile instead of waiting for it.
    """
    now = time.monotonic()
    if now - trainer.scratch.get("members-checked", 0.0) < WATCH_INTERVAL:
        return
    trainer.scratch["members-checked"] = now
    live = trainer.live_workers()
    if live == trainer.scratch.get("members-seen"):
        return
    if _plan(trainer, live, mid_epoch=True) is None:
        trainer.scratch["members-seen"] = live
        return
    joined = sorted(set(live) - set(trainer.replica_workers))
    if joined and not _warm(trainer.client, joined):
        return  # the replicas train on while the new workers import torch; look again later
    trainer.scratch["members-seen"] = live
    raise MembersChanged(f"workers now {live}")


def _warm(client, workers: list[str]) -> bool:
    """Whether ``workers`` are past their start-up (:func:`daskdist.torch_warmup.is_warm`).

    A worker that cannot answer counts as warm: the join then goes ahead.
    """
    answers = client.run(is_warm, workers=workers, on_error="return")
    return all(answer is not False for answer in answers.values())


def pause(trainer, ctx) -> tuple:
    """After :class:`MembersChanged`: end the attempt after the round running now.

    Waits for the oldest unfinished round that can be resumed from (the one
    running: the rounds before it are done), lets go of the later ones (each
    waits for the one before, so none started) and of tasks not sent yet,
    and has the strategy turn that round's output into a whole state
    (``finish_epoch``). Returns ``(future of that state, round it holds)``.
    """
    tracker, kept, waited = trainer.tracker, None, False
    for state_round in sorted(tracker.resumes):
        future, resume = tracker.resumes[state_round]
        if future.status != "finished":
            if waited:
                break  # queued behind the round waited for: not started
            trainer.wait([future])
            waited = True
        trainer.check(future)
        kept = state_round
    plan_round, output, plans = tracker.resumes[kept][1]
    trainer.queue.release_rounds_after(plan_round)
    tracker.drop_after(kept)
    final = ctx.flush(trainer.strategy.finish_epoch(ctx, output, plans))
    # the rounds planned again start from this state: fresh keys, never the dropped tasks'
    trainer.generation += 1
    return final, plan_round + 1


def _plan(trainer, live: list[str], mid_epoch: bool = False):
    """``(keep, workers)`` of the replicas following ``live``, or None to leave them."""
    current = list(trainer.replica_workers)
    if not live:
        return None
    n = _target(trainer, live)
    departures = trainer.scratch.setdefault("departures", {})
    if n < len(current):
        # only replicas whose worker left gracefully (its shard moved, not lost) merge away:
        # after a crash the replica count stays, so that the recovered fit stays the one a
        # fault-free fit would have been, and a worker brought back takes the replica again
        graceful = [i for i, w in enumerate(current) if w not in live and left_gracefully(
            trainer.client, w, departures)]
        n = max(n, len(current) - len(graceful))
    if mid_epoch and (n == len(current) or any(
            w not in live and not left_gracefully(trainer.client, w, departures)
            for w in current)):
        return None
    keep, workers = plan_placement(current, live, n)
    if keep == list(range(len(current))) and workers == current:
        return None
    if n != len(current):
        why = (trainer.strategy.elastic_refusal()
               or trainer.shard_set.source.resize_refusal)
        if why:
            if mid_epoch:
                return None
            _refused(trainer, why, "the replica count stays")
            n = len(current)  # the replicas still move off workers that left
            keep, workers = plan_placement(current, live, n)
            if keep == list(range(len(current))) and workers == current:
                return None
    why = None
    if trainer.shard_set.streaming and len(keep) > sum(
            len(c) for c in trainer.stream_chunks or trainer.shard_set.source.stream_chunks()):
        why = "its streamed shards have fewer chunks than replicas"
    if not why:
        try:
            trainer.strategy.check_replicas(workers)
        except ValueError as error:
            why = str(error)
    if why:
        if not mid_epoch:
            _refused(trainer, why)
        return None
    return keep, workers


def follow_workers(trainer, step: int | None = None) -> dict | None:
    """Re-place replicas and shards to follow the workers.

    Parameters
    ----------
    trainer : daskdist.driver.trainer.Trainer
    step : int, optional
        Between two rounds of an epoch: the epoch's step every replica
        reached (the new shards carry the rows the epoch has left). None: at
        an epoch boundary.

    Returns
    -------
    dict or None
        What changed (``{"epoch", "round", "before", "after", "joined",
        "left"}``), or None when nothing did (or the fit does not follow its
        workers).
    """
    if not trainer.elastic:
        return None
    live = trainer.live_workers()
    trainer.scratch["members-seen"] = live
    planned = _plan(trainer, live, mid_epoch=step is not None)
    if planned is None:
        return None
    keep, workers = planned
    current, n = list(trainer.replica_workers), len(keep)
    if recovery.lost_shards(trainer.shards):  # a worker died since: rebuild first
        recovery.replace_lost_shards(trainer)
    reshard.reshard(trainer, keep, workers, step)
    change = {"epoch": trainer.epoch, "round": trainer.round, "before": len(current),
              "after": n, "joined": sorted(set(workers) - set(current)),
              "left": sorted(set(current) - set(live))}
    when = (f"before epoch {trainer.epoch + 1}" if step is None
            else f"in epoch {trainer.epoch + 1}, from round {trainer.round}")
    logger.warning("daskdist run %s: workers changed %s (joined: %s; left: %s): "
                   "%d replicas on %d workers, then %d on %d", trainer.run_id, when,
                   ", ".join(change["joined"]) or "none", ", ".join(change["left"]) or "none",
                   len(current), len(set(current)), n, len(set(workers)))
    return change


def _refused(trainer, why: str, what: str = "the replicas stay where they are") -> None:
    """Say once per fit (and reason) why the replicas do not follow the workers."""
    if trainer.scratch.get("elastic-refused") != why:
        trainer.scratch["elastic-refused"] = why
        logger.warning("daskdist run %s: the workers changed, but %s: %s", trainer.run_id, what,
                       why)
