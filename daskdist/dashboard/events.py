"""Training events: what the driver and the workers tell the scheduler about a fit.

Events go through Dask's own event log (``log_event`` on a worker or a
client, topic :data:`TOPIC`), so they need no connection of their own and
reach the scheduler even while the client is busy. The scheduler's
:class:`~daskdist.dashboard.monitor.TrainingMonitor` keeps them for the
``/daskdist`` page, and the client's progress bar listens to them.

Every event is a dict with ``kind`` and ``run`` (the fit's run id):

- ``"start"``: ``name``, ``strategy``, ``replicas``, ``workers``, ``epochs``, ``t``;
- ``"round"``: a row of the round log — ``round``, ``epoch``, ``samples``,
  ``loss``, ``bytes``, ``compute_s``, ``t_start``, ``t_end`` and
  ``per_replica`` (``[replica, loss, samples, compute_s]`` rows) — sent by the
  worker that finished the round;
- ``"epoch"``: ``epoch`` and the epoch's ``train_loss``, ``valid_loss``,
  ``valid_acc`` and ``samples_per_sec``, sent by the driver;
- ``"end"``: ``status`` (``"finished"``, ``"failed"`` or ``"interrupted"``).
"""

from __future__ import annotations

import math

__all__ = ["MONITOR", "TOPIC", "clean", "emit_from_worker", "round_event"]

#: The topic of daskdist's events in Dask's event log.
#: The name of the scheduler plugin that keeps the runs (``TrainingMonitor``).
MONITOR = "daskdist-monitor"
TOPIC = "daskdist"


def clean(value):
    """A msgpack-friendly copy: tuples as lists, NaN and inf as None."""
    if isinstance(value, dict):
        return {str(k): clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [clean(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if hasattr(value, "item"):  # numpy scalars
        return clean(value.item())
    return value


def round_event(run_id: str, record: dict) -> dict:
    """The ``"round"`` event of a round-log record.

    See :func:`daskdist.worker.aggregation.log_round`.
    """
    samples = record["samples"]
    return clean({
        "kind": "round", "run": run_id, "round": record["round"], "epoch": record["epoch"],
        "samples": samples, "loss": record["loss_sum"] / samples if samples else None,
        "bytes": record["bytes"], "compute_s": record["compute_s"],
        "t_start": record["t_start"], "t_end": record["t_end"],
        "per_replica": [[r, loss / n if n else None, n, compute]
                        for r, loss, n, compute in record.get("per_replica", ())],
    })


def emit_from_worker(event: dict) -> None:
    """Log ``event`` from the worker running the current task (nothing outside a worker)."""
    try:
        from distributed import get_worker

        worker = get_worker()
    except ValueError:
        return
    worker.log_event(TOPIC, event)
