"""Where things run: each worker's device for a fit.

Before any data is sent, the driver asks every worker what it sees
(:func:`daskdist.worker.devices.worker_info`) and places each host's workers
on its GPUs in turn (:func:`plan_devices`); a worker without one trains on
its CPU, and the fit warns.
"""

from __future__ import annotations

import torch

from ..worker.devices import is_cuda

__all__ = ["plan_devices"]


def plan_devices(requested: str, infos: dict) -> tuple[dict, list]:
    """Each worker's device for a fit that asks for ``requested``.

    Parameters
    ----------
    requested : str
        The estimator's ``device`` (``"cpu"``, ``"cuda"``, ``"cuda:1"``...).
    infos : dict
        Worker address -> :func:`worker_info` of that worker.

    Returns
    -------
    placement : dict
        Worker address -> device. ``"cuda"`` places the CUDA workers of each
        host on its devices in turn (in address order); ``"cuda:N"`` keeps
        the index where the worker has that device.
    fallback : list of str
        Workers that were asked for CUDA and train on their CPU.
    """
    if not is_cuda(requested):
        return {w: requested for w in infos}, []
    index = torch.device(requested).index
    placement, fallback, seen = {}, [], {}
    for worker in sorted(infos):
        info = infos[worker]
        count = info.get("cuda", 0)
        if index is not None and index < count:
            placement[worker] = f"cuda:{index}"
        elif index is None and count:
            host = info.get("host")
            nth = seen[host] = seen.get(host, -1) + 1
            placement[worker] = f"cuda:{nth % count}"
        else:
            placement[worker] = "cpu"
            fallback.append(worker)
    return placement, fallback
