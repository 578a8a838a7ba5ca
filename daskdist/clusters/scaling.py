"""A spec's scaling: a fixed number of ``workers``, or ``adapt`` between two bounds."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .errors import ClusterSpecError

if TYPE_CHECKING:
    from .backends.base import Backend
    from .spec import ClusterSpec


def initial_workers(spec: ClusterSpec) -> int | None:
    """The workers to start with: ``adapt.minimum``, else ``workers``."""
    adapt = spec.data.get("adapt")
    return adapt["minimum"] if adapt is not None else spec.data.get("workers")


def start_adapting(spec: ClusterSpec, cluster) -> None:
    """Turn on adaptive scaling when the spec asks for it."""
    adapt = spec.data.get("adapt")
    if adapt is not None:
        cluster.adapt(minimum=adapt["minimum"], maximum=adapt["maximum"])


def check_scaling(data: dict, where: str, backend: Backend) -> None:
    """Check what the schema cannot: workers or adapt, and adapt's bounds in order.

    Raises
    ------
    ClusterSpecError
        When both are given, adapt's maximum is below its minimum, or a back
        end that must be told how many workers to start is given neither.
    """
    adapt = data.get("adapt")
    if adapt is not None:
        if data.get("workers") is not None:
            raise ClusterSpecError(f"{where}: workers: give either workers (a fixed number) or "
                                   f"adapt (minimum and maximum), not both; set the other to null")
        if adapt["maximum"] < adapt["minimum"]:
            raise ClusterSpecError(f"{where}: adapt.maximum: expected an integer >= adapt.minimum "
                                   f"({adapt['minimum']}), got {adapt['maximum']}")
    elif backend.scaling == "required" and data.get("workers") is None:
        raise ClusterSpecError(f"{where}: workers: missing required field; expected an integer "
                               f">= 1, or adapt with minimum and maximum")


def scaling_text(spec: ClusterSpec, backend: Backend) -> str:
    """The spec's scaling in words, for dry runs."""
    adapt, workers = spec.data.get("adapt"), spec.data.get("workers")
    if adapt is not None:
        return (f"adaptive, {adapt['minimum']} to {adapt['maximum']} workers "
                f"(idle workers are retired gracefully)")
    if backend.scaling is None:
        return backend.fixed_text(spec)
    return f"fixed, {workers} worker(s)" if workers is not None else backend.fixed_text(spec)
