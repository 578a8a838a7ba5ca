"""The back ends a cluster spec may name, one module per family.

:data:`BACKENDS` maps each ``backend:`` value to the :class:`~.base.Backend`
that validates, describes and starts it.
"""

from __future__ import annotations

from .address import Address
from .base import Backend
from .jobqueue import PBS, Slurm
from .kubernetes import Kubernetes
from .local import Local, LocalCUDA
from .ssh import SSH

__all__ = ["BACKENDS", "Backend"]

#: Each back end by the name a spec's ``backend:`` gives.
BACKENDS: dict[str, Backend] = {
    backend.name: backend
    for backend in (Local(), LocalCUDA(), SSH(), Slurm(), PBS(), Kubernetes(), Address())
}
