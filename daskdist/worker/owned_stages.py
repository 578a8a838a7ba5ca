"""Pipeline stages that own their state: across epochs, for scoring, prediction and gathering.

With ``strategy__build="workers"`` a stage's parameters and optimizer state
exist only in the stage's cache on its worker (:mod:`daskdist.worker.stage_cache`):
built and initialised there in the fit's first epoch, carried from one epoch
to the next without ever travelling, and kept after the fit for the fitted
estimator (:func:`keep_run`, :func:`release_run`). Hold-out scores and
predictions flow through the stages as forward-only tasks (:func:`infer`);
:func:`stage_tensors` hands one stage's tensors to a caller that gathers the
whole model on purpose.
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import StagesLost
from .devices import autocast, to_device
from .replica import valid_batches
from .runtime import worker_address
from .stage_cache import LiveStage, kept, lock, stages
from .stage_files import restore_stage
from .stage_tasks import from_wire, to_wire
from .stages import StageLayout

__all__ = ["own_stage", "keep_run", "release_run", "holdout_batches", "input_batches",
           "infer", "stage_tensors"]


def _lost(run_id: str, replica: int, stage: int, why: str) -> StagesLost:
    return StagesLost(
        f"Stage {stage} of pipeline replica {replica} (fit {run_id}) {why} on "
        f"{worker_address()}. Stages built on their workers (strategy__build='workers') keep "
        "the only copy of their parameters, and no checkpoint was saved at the start of this "
        "epoch to rebuild them from: resume from the last sharded checkpoint, or save one "
        "every epoch (Checkpoint(every=1)) to let a fit recover on its own.")


def own_stage(spec, *, run_id: str, replica: int, layout: StageLayout, round: int,
              attempt: str, random_state: int, fresh: bool, restore: dict | None = None) -> int:
    """Bring a stage that keeps its state to ``round``, the epoch's start; return the round.

    The ``daskdist-stage-own`` task, in place of loading the stage. A stage
    already here at ``round`` goes on as it is. Otherwise (the fit's first
    epoch, or the epoch run again after a lost worker) it is built here
    afresh from what holds its state at ``round``: its initial values
    (``fresh``: round 0 of a new fit), or a sharded checkpoint saved at
    ``round`` (``restore``, its index: a resumed fit, or the last checkpoint
    of a fit that lost a stage; :mod:`daskdist.worker.stage_files`). With
    neither, the fit stops with :class:`~daskdist.errors.StagesLost`.
    """
    key = (run_id, replica, layout.index)
    with lock:
        stage = stages.get(key)
        if stage is None or stage.round != round:
            if not fresh and restore is None:
                why = ("is not on its worker any more" if stage is None else
                       f"is at round {stage.round}, not {round} where the epoch starts,")
                raise _lost(run_id, replica, layout.index, why)
            stages.pop(key, None)
            del stage  # (its memory goes before the new one's comes)
            stage = LiveStage(spec, layout, random_state)
            if restore is not None:
                restore_stage(stage, restore)
            stage.round = round
            stages[key] = stage
    with stage.lock:
        stage.spec = spec
        stage.optimizer.zero_grad(set_to_none=True)
        stage.saved.clear()
        stage.saved_bytes.clear()
        stage.records, stage.attempt = [], attempt
    return round


def keep_run(run_id: str) -> bool:
    """Keep this worker's stages of ``run_id`` after the fit ends (``Client.run``)."""
    kept.add(run_id)
    return True


def release_run(run_id: str) -> int:
    """Let go of this worker's stages of ``run_id``; return how many were dropped."""
    kept.discard(run_id)
    with lock:
        keys = [k for k in stages if k[0] == run_id]
        for k in keys:
            del stages[k]
    return len(keys)


def _stage(run_id: str, replica: int, stage: int) -> LiveStage:
    found = stages.get((run_id, replica, stage))
    if found is None:
        raise _lost(run_id, replica, stage, "is not on its worker any more")
    return found


def holdout_batches(shard, batch_size: int, run_id: str) -> list:
    """A shard's hold-out rows as ``(X, y)`` batches of ``batch_size`` rows."""
    return [(X, y) for X, y in valid_batches(shard, batch_size, run_id)]


def input_batches(X: np.ndarray, batch_size: int) -> list:
    """``X`` as batches of ``batch_size`` rows without targets, every batch of one shape.

    A short last batch is filled up with copies of its own rows (dropped
    from the output by :func:`infer`), so that a row's output does not
    depend on the rows that share its batch (:func:`daskdist.predict.pad_rows`).
    """
    from ..predict import pad_rows

    batches = []
    for start in range(0, len(X), batch_size):
        rows = torch.from_numpy(np.ascontiguousarray(X[start:start + batch_size]))
        padded, n = pad_rows(rows, batch_size)
        batches.append((padded, n if n is not None else len(rows)))
    return batches


def infer(batches: list, *, run_id: str, replica: int, stage: int, n_stages: int,
          score: bool = False):
    """A stage's forward pass, in evaluation mode, of every batch in ``batches``.

    The ``daskdist-stage-infer`` task. ``batches`` are ``(inputs, targets)``
    pairs: the targets are labels (hold-out scoring, ``score=True``) or the
    rows to keep (prediction). A stage other than the last returns the
    batches for the next stage. The last returns ``{"n", "loss_sum",
    "correct"}`` when scoring, else the outputs of every batch, one float32
    array.
    """
    state = _stage(run_id, replica, stage)
    spec, device = state.spec, state.device
    last = stage == n_stages - 1
    out, n, loss_sum, correct = [], 0, 0.0, 0
    with state.lock, torch.no_grad():
        state.module.eval()
        try:
            for x, y in batches:
                x = x if isinstance(x, torch.Tensor) else from_wire(x)
                with autocast(spec.precision, device):
                    result = state.module(to_device(x, device))
                if not last:
                    out.append((to_wire(result), y))
                elif score:
                    y = to_device(y, device)
                    loss_sum += float(spec.loss(result, y).item()) * len(y)
                    correct += int((result.argmax(dim=1) == y).sum().item()) \
                        if spec.classifier else 0
                    n += len(y)
                else:
                    out.append(result[:y].float().cpu().numpy())
        finally:
            state.module.train()
    if not last:
        return out
    if score:
        return {"replica": replica, "n": n, "loss_sum": loss_sum, "correct": correct}
    return np.concatenate(out) if out else np.zeros((0,), np.float32)


def stage_tensors(run_id: str, replica: int, stage: int) -> dict:
    """The stage's parameters and buffers by their names in the whole model, as numpy."""
    state = _stage(run_id, replica, stage)
    with state.lock:
        return {name: tensor.detach().cpu().numpy().copy()
                for name, tensor in state.module.state_dict().items()}
