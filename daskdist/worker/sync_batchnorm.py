"""Synchronised BatchNorm for ``ddp`` ranks, on gloo and the CPU as well as on CUDA.

torch's :class:`~torch.nn.SyncBatchNorm` refuses CPU tensors, so it cannot run
on gloo. :class:`GroupBatchNorm` normalises each rank's slice with the
statistics of the whole step's batch over every rank: in the forward pass
one all-reduce of each channel's count, sum and sum of squares (in float64),
in the backward pass one all-reduce of each channel's sums of the output
gradient and of its product with the normalised input. The running
statistics move as those of the combined batch, the same on every rank. A
``ddp`` fit with it equals single-process training on the combined batch.

On CUDA ranks (NCCL) torch's own ``SyncBatchNorm`` is used instead
(:func:`convert`).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ["GroupBatchNorm", "convert"]


def _channel_dims(x: torch.Tensor) -> list[int]:
    return [0, *range(2, x.dim())]


def _per_channel(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return t.view(1, -1, *([1] * (x.dim() - 2)))


class _SyncNorm(torch.autograd.Function):
    """Batch normalisation with statistics all-reduced over the default process group."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, eps, factor):
        dims = _channel_dims(x)
        channels = x.shape[1]
        xd = x.detach().double()
        local = torch.cat([torch.tensor([x.numel() / channels], dtype=torch.float64,
                                        device=x.device),
                           xd.sum(dims), (xd * xd).sum(dims)])
        dist.all_reduce(local)
        n = local[0]
        mean = local[1:1 + channels] / n
        var = (local[1 + channels:] / n - mean * mean).clamp_min(0.0)
        if running_mean is not None and factor is not None:
            with torch.no_grad():
                running_mean.mul_(1 - factor).add_((factor * mean).to(running_mean.dtype))
                unbiased = var * n / (n - 1) if n > 1 else var
                running_var.mul_(1 - factor).add_((factor * unbiased).to(running_var.dtype))
        invstd = (var + eps).rsqrt().to(x.dtype)
        xhat = (x - _per_channel(mean.to(x.dtype), x)) * _per_channel(invstd, x)
        ctx.save_for_backward(xhat, weight, invstd)
        ctx.n = float(n)
        out = xhat
        if weight is not None:
            out = out * _per_channel(weight, x)
        if bias is not None:
            out = out + _per_channel(bias, x)
        return out

    @staticmethod
    def backward(ctx, dy):
        xhat, weight, invstd = ctx.saved_tensors
        dims = _channel_dims(dy)
        sum_dy = dy.sum(dims)
        sum_dy_xhat = (dy * xhat).sum(dims)
        both = torch.cat([sum_dy, sum_dy_xhat]).double()
        dist.all_reduce(both)
        channels = dy.shape[1]
        mean_dy = (both[:channels] / ctx.n).to(dy.dtype)
        mean_dy_xhat = (both[channels:] / ctx.n).to(dy.dtype)
        scale = invstd if weight is None else invstd * weight
        dx = _per_channel(scale, dy) * (dy - _per_channel(mean_dy, dy)
                                        - xhat * _per_channel(mean_dy_xhat, dy))
        grad_weight = sum_dy_xhat if weight is not None and ctx.needs_input_grad[1] else None
        grad_bias = sum_dy if ctx.needs_input_grad[2] else None
        return dx, grad_weight, grad_bias, None, None, None, None


class GroupBatchNorm(_BatchNorm):
    """BatchNorm over the combined batch of every rank of the default process group.

    Takes the place of a ``BatchNorm1d/2d/3d`` layer (same parameters and
    buffers, so the same state); in eval mode, or outside a process group, it
    is that layer.
    """

    def _check_input_dim(self, input):
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, x):
        self._check_input_dim(x)
        if not (self.training and dist.is_available() and dist.is_initialized()):
            return super().forward(x)
        factor = None
        if self.track_running_stats and self.running_mean is not None:
            self.num_batches_tracked.add_(1)
            factor = (1.0 / float(self.num_batches_tracked) if self.momentum is None
                      else self.momentum)
        return _SyncNorm.apply(x, self.weight, self.bias, self.running_mean, self.running_var,
                               self.eps, factor)


def _group_layer(layer: _BatchNorm) -> GroupBatchNorm:
    new = GroupBatchNorm(layer.num_features, layer.eps, layer.momentum, layer.affine,
                         layer.track_running_stats)
    if layer.affine:
        new.weight, new.bias = layer.weight, layer.bias
    new.running_mean, new.running_var = layer.running_mean, layer.running_var
    new.num_batches_tracked = layer.num_batches_tracked
    new.train(layer.training)
    return new


def convert(module: torch.nn.Module, device) -> torch.nn.Module:
    """Make ``module``'s BatchNorm layers synchronised, in place; returns ``module``.

    The layers keep their parameters and buffers (the same tensors), so an
    optimizer built over ``module`` goes on working. CUDA: torch's
    ``SyncBatchNorm``; otherwise :class:`GroupBatchNorm`. A ``module`` that
    is itself a BatchNorm layer is refused (its owner could not see the
    swap).
    """
    if isinstance(module, _BatchNorm):
        raise ValueError("strategy__sync_batchnorm needs the BatchNorm layers inside a module.")
    cuda = torch.device(device).type == "cuda"
    for name, child in list(module.named_children()):
        if isinstance(child, (GroupBatchNorm, torch.nn.SyncBatchNorm)):
            continue
        if isinstance(child, _BatchNorm):
            setattr(module, name, torch.nn.SyncBatchNorm.convert_sync_batchnorm(child)
                    if cuda else _group_layer(child))
        else:
            convert(child, device)
    return module
