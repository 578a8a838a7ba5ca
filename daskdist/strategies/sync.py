"""``sync``: synchronous gradient averaging, one round per optimizer step."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch

from ..aggregation import combine, log_round
from ..replica import _replica, gradient
from ..state import TrainingState, module_to_state
from .base import Strategy

__all__ = ["Sync", "apply_gradient"]


def _set_grads(module: torch.nn.Module, flat: np.ndarray) -> None:
    offset = 0
    for p in module.parameters():
        n = p.numel()
        g = torch.from_numpy(flat[offset:offset + n]).view_as(p).to(p.device)
        if p.grad is None:
            p.grad = g.clone()
        else:
            p.grad.copy_(g)
        offset += n


def apply_gradient(spec, state: TrainingState, *parts, plan, replica_workers) -> TrainingState:
    """Average the replicas' gradients and take one optimizer step.

    The root ``daskdist-average`` task of :class:`Sync`. Gradients are weighted
    by the samples each replica computed them on, so the step is the step of
    single-process training on the combined batch. Buffers (batch-norm
    statistics) are averaged the same way.
    """
    total = combine(*parts)
    mean = total.mean()
    rep = _replica(spec, plan.run_id, "updater")
    rep.load(state)
    if mean is not None:
        rep.set_lr(plan.lr)
        rep.optimizer.zero_grad(set_to_none=False)
        _set_grads(rep.module, mean["grad"])
        rep.optimizer.step()
        with torch.no_grad():
            for name, buf in rep.module.named_buffers():
                buf.copy_(torch.from_numpy(np.asarray(mean["buffers"][name])))
        new = module_to_state(rep.module, rep.optimizer, step=state.step + 1,
                              round=state.round + 1, log=state.log)
    else:
        new = replace(state, round=state.round + 1)
    new = replace(new, log=log_round(state.log, total, plan, new.nbytes, replica_workers))
    rep.state = new
    return new


class Sync(Strategy):
    """Synchronous data parallelism: every step, average gradients, then step.

    Each replica computes the gradient of its slice of the global batch; the
    gradients are averaged (weighted by slice size) and one optimizer step is
    taken, so every replica continues from the same parameters. This is the
    data-parallel algorithm whose result equals single-process SGD on the
    combined batch.
    """

    name = "sync"
    replica_task = staticmethod(gradient)
    finalize = staticmethod(apply_gradient)

    def __init__(self):
        pass

    def round_sizes(self, steps_per_epoch: int) -> list[int]:
        return [1] * steps_per_epoch
