"""BatchNorm's running statistics, combined over replicas as those of the combined batch.

Each replica's BatchNorm layers normalise its own slice of the batch and
update their running mean and variance from it. Where replicas' buffers are
averaged, a plain mean of running variances would leave out how far the
replicas' means lie apart; here:

- after a ``sync`` step (one step per round, every replica from the same
  buffers), :func:`combine_step` recovers each replica's batch mean and
  variance from its running statistics and the starting ones, pools them
  into the combined batch's, and updates the starting statistics with them
  as a single process training on the combined batch does;
- after several local steps (``local_sgd`` and relatives), the replicas'
  running statistics are pooled as a mixture: the mean of means, and the
  mean of variances plus the variance of the means. Each replica sends its
  running second moment (``running_var + running_mean²``,
  :func:`running_moments`) with its buffers, which every weighted sum
  carries linearly (also through ``hierarchical``'s groups), and
  :func:`pooled` turns the averaged moments back into variances.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch
from torch.nn.modules.batchnorm import _BatchNorm

from ..state import tree_weighted_sum

__all__ = ["batchnorm_layers", "running_moments", "pooled", "with_buffers", "count_rows",
           "combine_step"]


def batchnorm_layers(module: torch.nn.Module) -> dict:
    """``{prefix: layer}`` of the BatchNorm layers that keep running statistics."""
    return {name: m for name, m in module.named_modules()
            if isinstance(m, _BatchNorm) and m.track_running_stats
            and m.running_var is not None}


def running_moments(module: torch.nn.Module) -> dict:
    """``{prefix: running_var + running_mean²}`` of each BatchNorm layer (empty: none)."""
    out = {}
    for name, layer in batchnorm_layers(module).items():
        mean = layer.running_mean.detach().cpu().double()
        out[name] = (layer.running_var.detach().cpu().double() + mean * mean).numpy()
    return out


def _key(prefix: str, what: str) -> str:
    return f"{prefix}.{what}" if prefix else what


def pooled(buffers: dict, moments: dict) -> dict:
    """``buffers`` whose running variances are the averaged ``moments`` less the mean²."""
    out = dict(buffers)
    for prefix, second in moments.items():
        mean = np.asarray(buffers[_key(prefix, "running_mean")], dtype=np.float64)
        var_key = _key(prefix, "running_var")
        var = np.maximum(np.asarray(second, dtype=np.float64) - mean * mean, 0.0)
        out[var_key] = var.astype(np.asarray(buffers[var_key]).dtype)
    return out


def with_buffers(payload: dict) -> dict:
    """The ``buffers`` (and BatchNorm ``moments``, where there are) of a replica's payload."""
    return {key: payload[key] for key in ("buffers", "moments") if key in payload}


@contextlib.contextmanager
def count_rows(module: torch.nn.Module, counts: dict):
    """Record in ``counts`` how many values per channel each BatchNorm layer normalises.

    ``counts[prefix]`` adds up over the forward passes run inside the block
    (the micro-batches of a step).
    """
    handles = []
    for name, layer in batchnorm_layers(module).items():
        def hook(mod, inputs, name=name):
            if mod.training:
                x = inputs[0]
                counts[name] = counts.get(name, 0) + x.numel() // x.shape[1]
        handles.append(layer.register_forward_pre_hook(hook))
    try:
        yield counts
    finally:
        for handle in handles:
            handle.remove()


def combine_step(module: torch.nn.Module, start: dict, replicas: list, counts: list,
                 weights: list) -> dict:
    """The buffers after one step on the combined batch, from each replica's after its slice.

    Parameters
    ----------
    module : torch.nn.Module
        The replica's module (its layers' momentum).
    start : dict
        The buffers every replica started the step from.
    replicas : list of dict
        Each replica's buffers after its forward pass.
    counts : list of dict
        Each replica's values per channel of each BatchNorm layer (:func:`count_rows`).
    weights : list of float
        Each replica's share of the batch: other buffers are averaged with it.
    """
    out = dict(tree_weighted_sum(replicas, weights))
    for prefix, layer in batchnorm_layers(module).items():
        mean_key, var_key = _key(prefix, "running_mean"), _key(prefix, "running_var")
        n = np.array([c.get(prefix, 0) for c in counts], dtype=np.float64)
        if n.sum() < 2 or (n == 0).any():
            continue
        tracked = start.get(_key(prefix, "num_batches_tracked"))
        m = layer.momentum if layer.momentum is not None else 1.0 / (int(tracked) + 1)
        mean0 = np.asarray(start[mean_key], dtype=np.float64)
        var0 = np.asarray(start[var_key], dtype=np.float64)
        means = [(np.asarray(r[mean_key], np.float64) - (1 - m) * mean0) / m for r in replicas]
        vars_ = [(np.asarray(r[var_key], np.float64) - (1 - m) * var0) / m for r in replicas]
        total = n.sum()
        mean = sum(k * mu for k, mu in zip(n, means)) / total
        spread = sum((k - 1) * v + k * (mu - mean) ** 2 for k, v, mu in zip(n, vars_, means))
        dtype = np.asarray(start[var_key]).dtype
        out[mean_key] = ((1 - m) * mean0 + m * mean).astype(dtype)
        out[var_key] = ((1 - m) * var0 + m * spread / (total - 1)).astype(dtype)
    return out
