"""Dry forward passes on the client, before any work: lazy modules' shapes, output width.

One or two rows, in eval mode and without gradients, leaving no trace on
torch's generator (:mod:`daskdist.seeds`). Zeros for array inputs; a dict
input's first rows (:mod:`daskdist.data.named`), whose integer arrays may be
indices an embedding must find.
"""

from __future__ import annotations

import numpy as np
import torch

from .data.named import call, each, is_named, take
from .data.shards import feature_dtype, takes_indices
from .seeds import seed_for, seeded_torch, torch_rng_kept

__all__ = ["dry_input", "materialise_lazy", "check_output_width"]


def dry_input(module: torch.nn.Module, X, rows: int, device="cpu"):
    """``rows`` rows of input for ``module`` shaped like ``X``'s samples."""
    indices = takes_indices(module)
    if is_named(X):
        def convert(a):
            a = np.ascontiguousarray(a).astype(feature_dtype(a.dtype, index_features=indices))
            return torch.from_numpy(a).to(device)
        return each(take(X, slice(0, rows)), convert)
    dtype = torch.int64 if indices else torch.float32
    return torch.zeros((rows, *X.shape[1:]), dtype=dtype, device=device)


def materialise_lazy(net, X) -> None:
    """Run one dry forward pass so that ``net``'s lazy modules get their shapes."""
    if not any(isinstance(p, torch.nn.parameter.UninitializedParameter)
               for p in net.module_.parameters()):
        return
    net.module_.eval()
    seed = None if net.random_state is None else seed_for(net.random_state, 0)
    with torch.no_grad(), seeded_torch(seed):
        call(net.module_, dry_input(net.module_, X, 1))
    net._initialize_optimizer()


def check_output_width(net, X) -> None:
    """Refuse a module whose output columns do not match the targets (before any work).

    One forward pass of two rows on the client. Skipped where it cannot
    judge: a preprocessor (the module sees its output's width), outputs
    other than one 2-d tensor, or a module that cannot take the rows.
    """
    expected = getattr(net, "_n_outputs_", None)
    if expected is None or net.preprocessor is not None:
        return
    module = net.module_
    training = module.training
    device = next(module.parameters()).device
    try:
        module.eval()
        with torch.no_grad(), torch_rng_kept():
            out = call(module, dry_input(module, X, 2, device))
    except Exception:  # noqa: BLE001 - the workers will report the module's own error
        return
    finally:
        module.train(training)
    if not isinstance(out, torch.Tensor) or out.ndim != 2 or out.shape[1] == expected:
        return
    if net._classifier and out.shape[1] > expected and not net._named_classes():
        return  # classes=[]: class indices the targets seen so far do not reach
    what = "classes" if net._classifier else "target columns"
    raise ValueError(
        f"The module's output has {out.shape[1]} columns, but y has {expected} {what}: "
        f"give the module {expected} outputs (module__n_outputs={expected} for daskdist's "
        "models).")
