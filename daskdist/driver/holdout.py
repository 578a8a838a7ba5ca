"""Scoring the current state on every shard's hold-out, at the end of an epoch."""

from __future__ import annotations

from ..worker.replica import evaluate

__all__ = ["score_holdout"]


def score_holdout(trainer) -> dict:
    """Loss (and accuracy) of ``trainer``'s current state on every shard's hold-out.

    One ``daskdist-valid`` task per shard, on the shard's worker; ``{}`` when
    no shard holds hold-out rows.
    """
    futures = [
        trainer.client.submit(
            evaluate, trainer.spec_future, shard, trainer._state, trainer.run_id,
            max(trainer.batch_size, 1), key=trainer.task_key("valid", i, epoch=trainer.epoch),
            workers=[trainer.replica_workers[i]], allow_other_workers=True, pure=False)
        for i, shard in enumerate(trainer.shards)
    ]
    parts = trainer.client.gather(futures)
    n = sum(p["n"] for p in parts)
    if not n:
        return {}
    out = {"loss": sum(p["loss_sum"] for p in parts) / n, "n": n}
    if trainer.spec.classifier:
        out["acc"] = sum(p["correct"] for p in parts) / n
    return out
