"""What the client tells the scheduler about a fit: its start, epochs and end."""

from __future__ import annotations

import math
import time

from . import install
from .events import TOPIC, clean

__all__ = ["FitReporter"]


class FitReporter:
    """Reports one fit to the scheduler's monitor and drives the progress bar.

    Parameters
    ----------
    client : distributed.Client
        The fit's client.
    name : str
        What the page calls the run (the estimator's class, say).
    progress : bool
        Show a progress bar (:class:`~daskdist.progress.RoundProgress`).
    """

    def __init__(self, client, *, name: str, progress: bool):
        self.client, self.name, self.progress = client, name, progress
        #: The address of the ``/daskdist`` page, or ``None`` without one.
        self.link = install(client)
        self.run_id = None
        self._bar = None

    def _log(self, kind: str, **fields) -> None:
        try:
            self.client.log_event(TOPIC, clean({"kind": kind, "run": self.run_id, **fields}))
        except Exception:  # reporting must never break a fit
            pass

    def started(self, trainer, epochs: int) -> None:
        """The trainer has placed its shards; ``epochs`` epochs follow."""
        self.run_id = trainer.run_id
        per_epoch = trainer.strategy.rounds_per_epoch(trainer.steps_per_epoch, len(trainer.shards))
        self._log("start", name=self.name, strategy=getattr(trainer.strategy, "name", None),
                  replicas=len(trainer.shards), workers=len(set(trainer.replica_workers)),
                  epochs=epochs, rounds_per_epoch=per_epoch, t=time.time())
        if self.progress and epochs:
            from ..progress import RoundProgress

            self._bar = RoundProgress(self.client, trainer.run_id, per_epoch * epochs, per_epoch,
                                      first_round=trainer.round)

    def epoch(self, epoch: int, row: dict) -> None:
        """Epoch ``epoch`` (1-based, as in ``history``) ended with history row ``row``."""
        values = {k: row.get(k) for k in ("train_loss", "valid_loss", "valid_acc",
                                          "samples_per_sec")}
        changed = {"replicas": row.get("replicas"), "membership": row.get("membership")}
        self._log("epoch", epoch=epoch, **{k: v for k, v in values.items()
                                           if isinstance(v, float) and math.isfinite(v)},
                  **{k: v for k, v in changed.items() if v is not None})

    def finished(self, status: str) -> None:
        """The fit ended: ``"finished"``, ``"failed"`` or ``"interrupted"``."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self.run_id is not None:
            self._log("end", status=status, t=time.time())
