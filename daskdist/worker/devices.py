"""Where a replica trains: each worker's device, mixed precision, host-to-device copies.

The estimators' ``device`` names where the *workers* train. ``"cuda"`` gives
each worker its own GPU: the driver asks every worker what it sees
(:func:`worker_info`) and places workers of one host on its GPUs in turn
(:func:`plan_devices`; with dask-cuda, or any worker started with
``CUDA_VISIBLE_DEVICES`` set to one GPU, that is the worker's GPU). A worker
without CUDA trains on its CPU, and the fit warns about it. The plan travels
with the model specification, and a task asks :func:`device_here` for its
worker's device.

``precision="bf16"`` or ``"fp16"`` runs the forward pass and the loss under
:func:`torch.autocast`; ``"fp16"`` also scales the loss with a
:class:`torch.amp.GradScaler` per replica (:func:`grad_scaler`), whose
skipped steps are its own (an overflow is not a non-finite update).
"""

from __future__ import annotations

import contextlib
import os
import warnings

import torch

from ..plan import RoundPlan
from ..seeds import seed_for
from .runtime import worker_address

__all__ = ["PRECISIONS", "check_precision", "is_cuda", "worker_info", "device_here",
           "autocast", "grad_scaler", "use_device", "to_device", "seed_round",
           "seed_generators"]

#: Values of the estimators' ``precision``: None (float32) or a reduced float type.
PRECISIONS = {None: None, "bf16": torch.bfloat16, "fp16": torch.float16}

_warned: set = set()


def check_precision(precision) -> str | None:
    """``precision`` if valid (``"fp32"`` reads as None); raise ``ValueError`` otherwise."""
    if precision == "fp32":
        return None
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be None, 'fp32', 'bf16' or 'fp16', got {precision!r}.")
    return precision


def is_cuda(device) -> bool:
    """Whether ``device`` (a string or ``torch.device``) names a CUDA device."""
    return device is not None and torch.device(device).type == "cuda"


def worker_info(dask_worker=None) -> dict:
    """What a worker sees: its host, CUDA devices and ``GPU`` resource (``Client.run``)."""
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    host, gpu = "localhost", None
    if dask_worker is not None:
        from distributed.comm import get_address_host

        host = get_address_host(dask_worker.address)
        gpu = dask_worker.state.total_resources.get("GPU")
    return {"host": host, "cuda": count, "gpu_resource": gpu,
            "visible": os.environ.get("CUDA_VISIBLE_DEVICES")}


def device_here(requested: str, placement: dict | None = None) -> str:
    """This worker's device: its place in ``placement``, or ``requested`` if it can run here.

    A worker missing from the plan (one that joined after the fit started)
    falls back to its CPU when it has no CUDA device, with a warning in its
    log.
    """
    if placement:
        found = placement.get(worker_address())
        if found is not None:
            return found
    if is_cuda(requested):
        index = torch.device(requested).index or 0
        if not torch.cuda.is_available() or index >= torch.cuda.device_count():
            if requested not in _warned:
                _warned.add(requested)
                warnings.warn(f"device={requested!r} is not available on this worker; "
                              "training on its CPU.", RuntimeWarning, stacklevel=2)
            return "cpu"
    return requested


def autocast(precision: str | None, device: str):
    """A context that runs the forward pass (and loss) in ``precision``."""
    if precision is None:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=PRECISIONS[precision])


def grad_scaler(precision: str | None, device: str, init_scale: float = 2.0 ** 16):
    """A dynamic loss scaler for ``"fp16"`` (None otherwise)."""
    if precision != "fp16":
        return None
    return torch.amp.GradScaler(torch.device(device).type, init_scale=init_scale)


def use_device(device: str) -> bool:
    """Make ``device`` this thread's current GPU if it is one; whether it is.

    Without it, work a task does not place explicitly (a pinned copy, a
    seed) lands on GPU 0.
    """
    if not is_cuda(device):
        return False
    index = torch.device(device).index
    if index is not None and torch.cuda.current_device() != index:
        torch.cuda.set_device(index)
    return True


def to_device(tensor, device: str):
    """``tensor`` (or a dict of them) on ``device``; to a GPU through pinned memory, without
    blocking."""
    if tensor is None:
        return None
    if isinstance(tensor, dict):
        return {key: to_device(value, device) for key, value in tensor.items()}
    if is_cuda(device):
        if tensor.device.type == "cpu":
            tensor = tensor.pin_memory()
        return tensor.to(device, non_blocking=True)
    return tensor.to(device)


def seed_round(plan: RoundPlan, device: str) -> None:
    """Seed a replica's generators for its round: a pure function of the plan."""
    seed_generators(seed_for(plan.random_state, 2, plan.round, plan.replica), device)


def seed_generators(seed: int, device: str) -> None:
    """Seed the generators a replica on ``device`` uses (and make it the current GPU).

    Only those: ``torch.manual_seed`` also queues a lazy seeding of every
    CUDA device, which costs milliseconds on each call.
    """
    torch.default_generator.manual_seed(seed)
    if use_device(device):
        torch.cuda.manual_seed(seed)
