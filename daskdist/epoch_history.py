"""What an epoch adds to skorch's ``history``: one "batch" per round, and the epoch's totals."""

from __future__ import annotations

import numpy as np

from .driver.results import membership_text

__all__ = ["record_epoch"]


def record_epoch(history, result, strategy) -> None:
    """Record an epoch's :class:`~daskdist.driver.results.EpochResult` in ``history``.

    Each round that trained is a history batch (``train_loss``,
    ``train_batch_size``); the hold-out's loss (and accuracy) is one more;
    the epoch gets its round count, bytes, synchronisation time and
    throughput, and what the strategy adds (staleness, dropped updates,
    replica drift).
    """
    trained = [r for r in result.rounds if r["samples"]]  # not every update skipped
    for r in trained:  # one history "batch" per synchronisation round
        history.new_batch()
        history.record_batch("train_loss", r["loss"])
        history.record_batch("train_batch_size", r["samples"])
    if not trained:  # no finite update in the whole epoch
        history.record("train_loss", float("nan"))
    if result.valid:
        history.new_batch()
        history.record_batch("valid_loss", result.valid["loss"])
        history.record_batch("valid_batch_size", result.valid["n"])
        if "acc" in result.valid:
            history.record_batch("valid_acc", result.valid["acc"])
    history.record("train_batch_count", len(result.rounds))
    history.record("rounds", len(result.rounds))
    history.record("replicas", result.replicas)
    if result.changes:
        history.record("membership", "; ".join(membership_text(c) for c in result.changes))
    history.record("bytes_sent", int(sum(r["bytes"] for r in result.rounds)))
    history.record("sync_time", float(sum(r["sync_s"] for r in result.rounds)))
    if strategy.asynchronous:
        staleness = [r["staleness"] for r in result.rounds] or [0]
        history.record("max_staleness", int(max(staleness)))
        history.record("mean_staleness", float(np.mean(staleness)))
    if strategy.deadline is not None:
        history.record("dropped_updates", int(sum(r["dropped"] for r in result.rounds)))
    history.record("samples_per_sec", result.samples_per_sec)
    if result.drift is not None:
        history.record("replica_drift", result.drift)
