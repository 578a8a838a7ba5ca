"""Stages built where they live: a model planned on ``meta``, each stage made on its worker.

With ``strategy="pipeline", strategy__build="workers"`` the client builds the
model on torch's ``meta`` device: shapes and the module tree, no parameter
data. The stage specification sent to a worker carries that recipe (its
units, on ``meta``); the worker allocates the stage's tensors on its own
device (``Module.to_empty``) and initialises them (:func:`initialise`).

Initialisation calls ``reset_parameters()`` of every sub-module that holds
parameters or buffers of its own, unit by unit (:func:`~daskdist.worker.stages.stage_units`),
each unit under a seed drawn from ``random_state`` and the unit's path in
the model. A unit's initial values therefore depend on ``random_state`` and
its path only: not on the number of stages, the split points or the worker.
They do depend on the device (CPU and CUDA generators differ) and on the
modules' own ``reset_parameters`` (PyTorch's defaults for its layers).
:func:`daskdist.worker.stages.materialise` builds the whole model as the
workers build its stages, for a reference on a machine that holds it.
"""

from __future__ import annotations

import zlib

import torch

from ..seeds import seed_for

__all__ = ["on_meta", "check_buildable", "initialise"]

#: ``seed_for`` stream of the units' initial values.
_INIT_STREAM = 11


def on_meta(module: torch.nn.Module) -> bool:
    """Whether ``module``'s parameters and buffers are on the ``meta`` device (no data)."""
    tensors = [*module.parameters(), *module.buffers()]
    return bool(tensors) and all(t.is_meta for t in tensors)


def _owners(module: torch.nn.Module):
    """Sub-modules holding parameters or buffers of their own, with their paths."""
    for path, sub in module.named_modules():
        if next(sub.parameters(recurse=False), None) is not None or \
                next(sub.buffers(recurse=False), None) is not None:
            yield path, sub


def check_buildable(module: torch.nn.Module) -> None:
    """Raise ``ValueError`` unless every tensor of ``module`` can be made on a worker.

    A worker makes a tensor by calling ``reset_parameters()`` of the module
    that holds it; values set in a constructor (``nn.Parameter(torch.randn(...))``,
    a buffer computed there) do not survive the ``meta`` device.
    """
    if not on_meta(module):
        raise ValueError(
            "strategy__build='workers' builds the model on each stage's worker from its class "
            "and parameters; pass the class (module=MyModel, module__width=...) rather than "
            "a built module, whose parameters already take the client's memory.")
    bare = [path or type(module).__name__ for path, sub in _owners(module)
            if not callable(getattr(sub, "reset_parameters", None))]
    if bare:
        raise ValueError(
            f"strategy__build='workers' initialises each layer on its worker with the layer's "
            f"reset_parameters(); {bare} hold parameters or buffers but have no "
            "reset_parameters() method: add one that sets their values.")


def _seed(random_state: int, path: str) -> int:
    return seed_for(random_state, _INIT_STREAM, zlib.crc32(path.encode()))


def initialise(module: torch.nn.Module, paths, random_state: int, device="cpu"):
    """Allocate ``module`` on ``device`` and initialise the units at ``paths``.

    Each unit's sub-modules are reset in order under the unit's own seed;
    the process's random generators are left as they were. Returns the
    module.
    """
    module = module.to_empty(device=device)
    devices = [device] if torch.device(device).type == "cuda" else []
    with torch.no_grad():
        for path in paths:
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(_seed(random_state, path))
                for _, sub in _owners(module.get_submodule(path)):
                    sub.reset_parameters()
    return module
