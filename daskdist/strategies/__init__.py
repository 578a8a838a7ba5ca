"""Synchronisation strategies, chosen with ``strategy=`` by name or as an object."""

from __future__ import annotations

import numbers

from .asynchronous import Async
from .base import Strategy
from .ddp import DDP
from .diloco import DiLoCo
from .hierarchical import Hierarchical
from .local_sgd import LocalSGD
from .parameter_server import ParameterServer
from .pipeline import Pipeline
from .ssp import SSP
from .sync import Sync

__all__ = ["Strategy", "Sync", "LocalSGD", "Hierarchical", "ParameterServer", "Async", "SSP",
           "DDP", "Pipeline", "DiLoCo", "STRATEGIES", "resolve_strategy"]

#: Strategies by name.
STRATEGIES: dict[str, type[Strategy]] = {
    cls.name: cls for cls in (Sync, LocalSGD, Hierarchical, Async, SSP, DDP, Pipeline, DiLoCo)}


def resolve_strategy(strategy, options: dict | None = None, *, sync_every=None) -> Strategy:
    """Return a configured strategy object.

    Parameters
    ----------
    strategy : str or Strategy
        A name from :data:`STRATEGIES` or a strategy object (copied, never
        changed).
    options : dict, optional
        ``strategy__<name>`` options, set as attributes; they win over
        ``sync_every``.
    sync_every : int, optional
        The estimators' top-level ``sync_every``, given to strategies that take it.
    """
    if isinstance(strategy, str):
        if strategy not in STRATEGIES:
            raise ValueError(
                f"Unknown strategy {strategy!r}; choose one of {sorted(STRATEGIES)} "
                "or pass a Strategy object."
            )
        obj = STRATEGIES[strategy]()
    elif isinstance(strategy, Strategy):
        obj = strategy.copy()
    else:
        raise TypeError(
            f"strategy must be a name or a daskdist Strategy, got {type(strategy).__name__}."
        )
    options = dict(options or {})
    params = obj.get_params()
    if sync_every is not None and "sync_every" in params and "sync_every" not in options:
        if not isinstance(sync_every, numbers.Integral):
            raise ValueError(f"sync_every must be a positive integer, got {sync_every!r}.")
        options["sync_every"] = int(sync_every)
    if options:
        obj.set_params(**options)
    return obj
