"""Scoring the current state on every shard's hold-out, at the end of an epoch."""

from __future__ import annotations

from ..worker import owned_stages
from ..worker.replica import evaluate

__all__ = ["score_holdout"]


def score_holdout(trainer) -> dict:
    """Loss (and accuracy) of ``trainer``'s current state on every shard's hold-out.

    One ``daskdist-valid`` task per shard, on the shard's worker; ``{}`` when
    no shard holds hold-out rows.
    """
    if getattr(trainer.strategy, "holds_state", False):
        return _totals(trainer, _through_stages(trainer))
    futures = [
        trainer.client.submit(
            evaluate, trainer.spec_future, shard, trainer._state, trainer.run_id,
            max(trainer.batch_size, 1), key=trainer.task_key("valid", i, epoch=trainer.epoch),
            workers=[trainer.replica_workers[i]], allow_other_workers=True, pure=False)
        for i, shard in enumerate(trainer.shards)
    ]
    return _totals(trainer, trainer.client.gather(futures))


def _through_stages(trainer) -> list[dict]:
    """Each shard's hold-out sums, flowed through its pipeline's stages (``build="workers"``).

    A ``daskdist-valid-batches`` task cuts the hold-out into batches on the
    shard's worker; a ``daskdist-valid-stage`` task per stage runs them
    forward, and the last stage sums the loss.
    """
    grid, _ = trainer.strategy.placement(trainer.scratch)
    parts = []
    for i, shard in enumerate(trainer.shards):
        message = trainer.client.submit(
            owned_stages.holdout_batches, shard, max(trainer.batch_size, 1), trainer.run_id,
            key=trainer.task_key("valid-batches", i, epoch=trainer.epoch),
            workers=[grid[i][0]], pure=False)
        for s, worker in enumerate(grid[i]):
            message = trainer.client.submit(
                owned_stages.infer, message, run_id=trainer.run_id, replica=i, stage=s,
                n_stages=len(grid[i]), score=True, workers=[worker], allow_other_workers=False,
                key=trainer.task_key("valid-stage", i, s, epoch=trainer.epoch), pure=False)
        parts.append(message)
    return trainer.client.gather(parts)


def _totals(trainer, parts: list[dict]) -> dict:
    """The hold-out's mean loss (and accuracy) from every shard's sums."""
    n = sum(p["n"] for p in parts)
    if not n:
        return {}
    out = {"loss": sum(p["loss_sum"] for p in parts) / n, "n": n}
    if trainer.spec.classifier:
        out["acc"] = sum(p["correct"] for p in parts) / n
    return out
