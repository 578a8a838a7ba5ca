"""The scheduler's record of training runs, fed by daskdist's events."""

from __future__ import annotations

import time
from collections import OrderedDict

from distributed.diagnostics.plugin import SchedulerPlugin

from .events import MONITOR, TOPIC

__all__ = ["TrainingMonitor"]


class TrainingMonitor(SchedulerPlugin):
    """A scheduler plugin that keeps the runs of daskdist fits and serves ``/daskdist``.

    It listens to the :data:`~daskdist.dashboard.events.TOPIC` events and keeps,
    per run, the start event, the newest rounds and every epoch, for the runs
    of the cluster's lifetime (the oldest beyond ``max_runs`` are forgotten).
    When the plugin starts it adds the page's routes to the scheduler's own
    web server (:func:`daskdist._compat.add_http_routes`).

    Parameters
    ----------
    max_runs : int
        Runs kept.
    max_rounds : int
        Newest rounds kept per run.
    """

    name = MONITOR
    #: Registered once per scheduler: later fits keep the runs already recorded.
    idempotent = True

    def __init__(self, max_runs: int = 20, max_rounds: int = 5000):
        self.max_runs = max_runs
        self.max_rounds = max_rounds
        self.runs: OrderedDict = OrderedDict()

    async def start(self, scheduler) -> None:
        from .._compat import add_http_routes
        from .page import routes

        self.scheduler = scheduler
        add_http_routes(scheduler, routes)

    def log_event(self, topic, msg) -> None:
        if topic == TOPIC and isinstance(msg, dict) and "run" in msg:
            self.record(msg)

    def record(self, event: dict) -> None:
        """Add one event to its run."""
        run = self.runs.get(event["run"])
        if run is None:
            run = self.runs[event["run"]] = {"run": event["run"], "start": None, "rounds": {},
                                             "epochs": {}, "status": "running",
                                             "updated": time.time()}
            while len(self.runs) > self.max_runs:
                self.runs.popitem(last=False)
        run["updated"] = time.time()
        kind = event.get("kind")
        if kind == "start":
            run["start"] = event
        elif kind == "round":
            run["rounds"][event["round"]] = event  # a round run again replaces itself
            while len(run["rounds"]) > self.max_rounds:
                del run["rounds"][min(run["rounds"])]
        elif kind == "epoch":
            run["epochs"][event["epoch"]] = event
        elif kind == "end":
            run["status"] = event.get("status", "finished")

    def summary(self) -> list[dict]:
        """One line per run, newest first."""
        out = []
        for run in reversed(self.runs.values()):
            start = run["start"] or {}
            out.append({"run": run["run"], "name": start.get("name"), "status": run["status"],
                        "strategy": start.get("strategy"), "t": start.get("t"),
                        "rounds": len(run["rounds"]), "epochs": len(run["epochs"])})
        return out

    def data(self, run_id: str) -> dict | None:
        """Everything kept of one run, rounds and epochs in order (``None``: unknown run)."""
        run = self.runs.get(run_id)
        if run is None:
            return None
        return {"run": run_id, "status": run["status"], "start": run["start"],
                "rounds": [run["rounds"][r] for r in sorted(run["rounds"])],
                "epochs": [run["epochs"][e] for e in sorted(run["epochs"])]}
