"""What acts on each optimizer step of a replica: per-step schedules, clipping, accumulation.

Every strategy's step goes through these three helpers, so that a step means
the same wherever it is taken:

- :func:`set_hyper` gives the optimizer the step's hyperparameters: the
  round's learning rate, or, under a per-step schedule, the values the
  schedule computed on the client for that step
  (:attr:`~daskdist.plan.RoundPlan.schedule`; :mod:`daskdist.schedules`).
- :func:`clip_gradients` clips the gradient the step applies (by norm and/or
  by value, as skorch's ``GradientNormClipping`` / ``GradientValueClipping``
  do) — under ``sync`` and ``ddp`` the averaged gradient of the global batch,
  under ``local_sgd`` and relatives each replica's own.
- :func:`micro_batches` splits a step's batch into ``accumulate_steps``
  micro-batches whose gradients add up to the batch's mean gradient.
"""

from __future__ import annotations

import torch

from ..data.named import n_rows, take
from .runtime import set_lr

__all__ = ["set_hyper", "clip_gradients", "micro_batches"]


def set_hyper(optimizer, plan, k: int = 0) -> None:
    """Set the hyperparameters of step ``k`` of ``plan``'s round on ``optimizer``."""
    hyper = plan.hyper(k)
    if hyper is None:
        set_lr(optimizer, plan.lr)
        return
    for group, values in zip(optimizer.param_groups, hyper):
        group.update(values)


def clip_gradients(spec, params) -> None:
    """Clip the gradients of ``params`` as the spec says (norm first, then value)."""
    if spec.clip_norm is None and spec.clip_value is None:
        return
    grads = [p for p in params if p.grad is not None]
    if spec.clip_norm is not None:
        torch.nn.utils.clip_grad_norm_(grads, spec.clip_norm, norm_type=spec.clip_norm_type)
    if spec.clip_value is not None:
        torch.nn.utils.clip_grad_value_(grads, spec.clip_value)


def micro_batches(spec, X, y, w=None):
    """``(X, y, w, share)`` of each micro-batch of a step's batch.

    ``share`` is the micro-batch's fraction of the batch's rows (or of its
    sample weight, with ``w``). One micro-batch (the batch itself) unless the
    spec accumulates; a loss multiplied by its share and backpropagated for
    every micro-batch leaves the batch's mean gradient.
    """
    n = n_rows(X)
    parts = min(spec.accumulate, n) if n else 1
    if parts <= 1:
        return [(X, y, w, 1.0)]
    size = -(-n // parts)
    total = None if w is None else float(w.sum())
    out = []
    for i in range(0, n, size):
        part_w = None if w is None else w[i:i + size]
        share = (min(size, n - i) / n if w is None
                 else float(part_w.sum()) / total if total > 0 else 0.0)
        out.append((take(X, slice(i, i + size)), None if y is None else y[i:i + size], part_w,
                    share))
    return out
