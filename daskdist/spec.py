"""What a worker needs to rebuild a replica: the model specification.

A :class:`ModelSpec` is sent to the cluster once per fit (as a Dask future) and
holds the initialised module, the optimizer class and its arguments, the
criterion and how the loss is computed. Workers turn it into a live module and
optimizer with :meth:`ModelSpec.build`.
"""

from __future__ import annotations

import copy
import fnmatch
import itertools
from dataclasses import dataclass, field

import torch

from .seeds import seed_for  # re-exported: its home before daskdist/seeds.py

__all__ = ["ModelSpec", "param_groups", "seed_for"]


@dataclass
class ModelSpec:
    """The recipe for one replica.

    Attributes
    ----------
    module : torch.nn.Module
        An initialised module; each replica trains a copy of it (its
        parameters are overwritten by the training state each round).
    optimizer : type
        A ``torch.optim.Optimizer`` subclass.
    optimizer_kwargs : dict
        Its keyword arguments, skorch's ``param_groups`` patterns included.
    criterion : torch.nn.Module
        The loss module, with ``reduction="mean"``.
    log_probs : bool
        Take ``log(y_pred + eps)`` before the criterion, as skorch's
        classifier does for ``NLLLoss`` on probabilities.
    classifier : bool
        Targets are class indices (accuracy is reported).
    device : str
        Device the replicas train on (``"cuda"``: each worker's own GPU).
    precision : {None, "bf16", "fp16"}
        Train the forward pass in reduced precision (:mod:`daskdist.worker.devices`).
    placement : dict
        Worker address -> device, planned by the driver for ``device``
        (:func:`daskdist.worker.devices.plan_devices`); empty: ``device`` everywhere.
    clip_norm : float or None
        Clip the gradient each step applies to this norm (``None``: no clipping).
    clip_norm_type : float
        The norm ``clip_norm`` measures (2: Euclidean).
    clip_value : float or None
        Clip each gradient entry to ``[-clip_value, clip_value]``.
    accumulate : int
        Micro-batches each step's batch is split into, their gradients added
        up before the step (:func:`daskdist.worker.stepping.micro_batches`).
    """

    module: torch.nn.Module
    optimizer: type = torch.optim.SGD
    optimizer_kwargs: dict = field(default_factory=dict)
    criterion: torch.nn.Module = field(default_factory=torch.nn.MSELoss)
    log_probs: bool = False
    classifier: bool = False
    device: str = "cpu"
    precision: str | None = None
    placement: dict = field(default_factory=dict)
    clip_norm: float | None = None
    clip_norm_type: float = 2.0
    clip_value: float | None = None
    accumulate: int = 1

    def device_here(self) -> str:
        """The device replicas train on in this worker process."""
        from .worker.devices import device_here

        return device_here(self.device, self.placement)

    def build(self):
        """Return a fresh ``(module, optimizer)`` pair for a replica."""
        module = copy.deepcopy(self.module).to(self.device_here())
        kwargs = dict(self.optimizer_kwargs)
        groups = param_groups(module.named_parameters(), kwargs.pop("param_groups", []))
        return module, self.optimizer(groups, **kwargs)

    def loss(self, y_pred: torch.Tensor, y_true: torch.Tensor,
             weights: torch.Tensor | None = None) -> torch.Tensor:
        """The training loss of a batch, as the estimator defines it.

        With ``weights`` (one per row), the weighted mean of the rows' losses
        (the criterion with ``reduction="none"``; a row's loss is the mean
        over its other dimensions); 0 for a batch whose weights sum to 0.
        """
        if self.log_probs:
            y_pred = torch.log(y_pred + torch.finfo(y_pred.dtype).eps)
        if weights is None:
            return self.criterion_on(y_pred.device)(y_pred, y_true)
        rows = self._per_row(y_pred.device)(y_pred, y_true)
        if rows.dim() > 1:
            rows = rows.reshape(len(rows), -1).mean(dim=1)
        weights = weights.to(device=rows.device, dtype=rows.dtype)
        return (rows * weights).sum() / weights.sum().clamp_min(torch.finfo(rows.dtype).tiny)

    def _per_row(self, device) -> torch.nn.Module:
        """The criterion with ``reduction="none"`` (made once per worker process)."""
        per_row = self.__dict__.get("_criterion_per_row")
        if per_row is None:
            per_row = copy.deepcopy(self.criterion)
            per_row.reduction = "none"
            self.__dict__["_criterion_per_row"] = per_row
        held = next(itertools.chain(per_row.buffers(), per_row.parameters()), None)
        if held is not None and held.device != torch.device(device):
            per_row.to(device)
        return per_row

    def criterion_on(self, device) -> torch.nn.Module:
        """The criterion with its tensors (``criterion__weight``, say) on ``device``.

        Moved in place the first time a loss is computed on a device: the
        spec is unpickled once per worker process, and its replicas share it.
        """
        held = next(itertools.chain(self.criterion.buffers(), self.criterion.parameters()), None)
        if held is not None and held.device != torch.device(device):
            self.criterion.to(device)
        return self.criterion


def param_groups(named_parameters, patterns):
    """Group parameters the way skorch's ``optimizer__param_groups`` does."""
    params = list(named_parameters)
    groups = []
    for pattern, options in patterns:
        matches = [i for i, (name, _) in enumerate(params) if fnmatch.fnmatch(name, pattern)]
        if matches:
            groups.append({"params": [params.pop(i)[1] for i in reversed(matches)], **options})
    if params:
        groups.append({"params": [p for _, p in params]})
    return groups
