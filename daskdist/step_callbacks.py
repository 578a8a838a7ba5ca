"""Callbacks and parameters that act on every training step, and what the workers make of them.

Replicas run their own loop on the workers, so a skorch callback that acts per
batch on the client would never see a batch. Those that depend only on the
step count and on the replica's own module and optimizer act inside the
replicas' loops instead:

- ``LRScheduler(..., step_every="batch")`` with any torch scheduler but
  ``ReduceLROnPlateau`` (:mod:`daskdist.schedules`);
- skorch's ``GradientNormClipping``, daskdist's ``GradientValueClipping``,
  and the estimator parameter ``gradient_clip`` (a norm)
  (:func:`daskdist.worker.stepping.clip_gradients`);
- the estimator parameter ``accumulate_steps``
  (:func:`daskdist.worker.stepping.micro_batches`).

Every other callback that acts per batch is refused before any work is
submitted, with the reason (:func:`step_problems`).
"""

from __future__ import annotations

import numbers

from skorch.callbacks import (
    Callback,
    Checkpoint,
    EarlyStopping,
    EpochScoring,
    EpochTimer,
    GradientNormClipping,
    Initializer,
    InputShapeSetter,
    LoadInitState,
    LRScheduler,
    MlflowLogger,
    NeptuneLogger,
    ParamMapper,
    PassthroughScoring,
    PrintLog,
    SacredLogger,
    TensorBoard,
    TrainEndCheckpoint,
    WandbLogger,
)
from torch.optim.lr_scheduler import ReduceLROnPlateau

from .callbacks import Checkpoint as SafetensorsCheckpoint
from .callbacks import GradientValueClipping
from .schedules import batch_schedulers

__all__ = ["PER_STEP_HOOKS", "WORKER_CALLBACKS", "EPOCH_CALLBACKS", "clip_options",
           "step_problems"]

#: callback methods skorch calls per batch (or per gradient)
PER_STEP_HOOKS = ("on_batch_begin", "on_batch_end", "on_grad_computed")
#: callbacks whose per-step work runs on the workers
WORKER_CALLBACKS = (LRScheduler, GradientNormClipping, GradientValueClipping)
#: callbacks known to act at epoch boundaries only (their batch hooks are unused or inert
#: when no per-batch calls are made)
EPOCH_CALLBACKS = (EpochTimer, PassthroughScoring, PrintLog, EarlyStopping, Checkpoint,
                   SafetensorsCheckpoint, EpochScoring, TrainEndCheckpoint, InputShapeSetter,
                   LoadInitState, Initializer, TensorBoard, WandbLogger)
#: loggers whose per-batch logging is an option (``log_on_batch_end``)
LOGGERS = (MlflowLogger, NeptuneLogger, SacredLogger)


def _overrides(cb, method: str) -> bool:
    return getattr(type(cb), method) is not getattr(Callback, method)


def _positive(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and value > 0


def clip_options(net) -> dict:
    """``clip_norm``, ``clip_norm_type`` and ``clip_value`` for the model spec."""
    norm, norm_type, value = net.gradient_clip, 2.0, None
    for _, cb in net.callbacks_:
        if isinstance(cb, GradientNormClipping) and cb.gradient_clip_value is not None:
            norm, norm_type = cb.gradient_clip_value, float(cb.gradient_clip_norm_type)
        elif isinstance(cb, GradientValueClipping) and cb.gradient_clip_value is not None:
            value = cb.gradient_clip_value
    return {"clip_norm": None if norm is None else float(norm), "clip_norm_type": norm_type,
            "clip_value": None if value is None else float(value)}


def _clip_problems(net, strategy) -> list[str]:
    norms = [name for name, cb in net.callbacks_
             if isinstance(cb, GradientNormClipping) and cb.gradient_clip_value is not None]
    values = [(name, cb.gradient_clip_value) for name, cb in net.callbacks_
              if isinstance(cb, GradientValueClipping) and cb.gradient_clip_value is not None]
    problems = []
    if net.gradient_clip is not None and not _positive(net.gradient_clip):
        problems.append(f"gradient_clip={net.gradient_clip!r} (a positive norm, or None)")
    if len(norms) + (net.gradient_clip is not None) > 1:
        problems.append(f"gradient clipping by norm set more than once ({', '.join(norms)}"
                        f"{', gradient_clip' if net.gradient_clip is not None else ''}); "
                        "keep one")
    if len(values) > 1:
        problems.append("more than one GradientValueClipping; keep one")
    problems += [f"callback {name!r}: gradient_clip_value={v!r} (a positive number, or None)"
                 for name, v in values if not _positive(v)]
    if (norms or net.gradient_clip is not None) and strategy.name == "pipeline":
        problems.append("clipping by norm under strategy='pipeline': the gradient's norm "
                        "spans the stages, which step on different workers; clip by value "
                        "(GradientValueClipping) instead")
    return problems


def step_problems(net, strategy) -> list[str]:
    """What in ``net``'s callbacks and per-step parameters cannot act on the workers, and why."""
    problems = _clip_problems(net, strategy)
    accumulate = net.accumulate_steps
    if not (isinstance(accumulate, numbers.Integral) and not isinstance(accumulate, bool)
            and accumulate >= 1):
        problems.append(f"accumulate_steps={accumulate!r} (an integer >= 1)")
    elif accumulate > 1 and strategy.name in ("ddp", "pipeline"):
        reason = ("it all-reduces in every backward pass" if strategy.name == "ddp"
                  else "it splits each step into strategy__n_micro_batches already")
        problems.append(f"accumulate_steps={accumulate} under strategy={strategy.name!r}: "
                        f"{reason}; use a smaller batch_size, or strategy='sync'")
    for name, cb in batch_schedulers(net.callbacks_):
        if cb._get_policy_cls() is ReduceLROnPlateau:
            problems.append(f"callback {name!r}: ReduceLROnPlateau per batch reads every "
                            "batch's score from the history, which lives on no worker; use "
                            "step_every='epoch'")
        elif strategy.asynchronous:
            problems.append(f"callback {name!r}: a per-step schedule under "
                            f"strategy={strategy.name!r}, whose replicas move through their "
                            "shards at their own pace (there is no common step); use "
                            "step_every='epoch', or strategy='local_sgd'")
    for name, cb in net.callbacks_:
        if isinstance(cb, LOGGERS):
            if getattr(cb, "log_on_batch_end", False):
                problems.append(f"callback {name!r}: log_on_batch_end=True logs per batch on "
                                "the client, where no batch runs; log_on_batch_end=False logs "
                                "every epoch (with a row per round in rounds_)")
            continue
        if isinstance(cb, ParamMapper) and not isinstance(cb, Initializer):
            problems.append(f"callback {name!r} ({type(cb).__name__}) changes the module's "
                            "parameters (requires_grad) on the client during the fit, while "
                            "the replicas are built once per fit; freeze in the module "
                            "(requires_grad=False) or with optimizer__param_groups and lr=0")
            continue
        if isinstance(cb, WORKER_CALLBACKS + EPOCH_CALLBACKS):
            continue
        hooks = [h for h in PER_STEP_HOOKS if _overrides(cb, h)]
        if hooks:
            problems.append(f"callback {name!r} ({type(cb).__name__}) acts per batch "
                            f"({', '.join(hooks)}) on the client, where no batch runs")
    return problems
