"""The pipeline stages a worker holds: their live modules, keyed by fit, replica and stage.

Each worker process keeps the stages it trains in :data:`stages`, keyed by
``(run_id, replica, stage)``: a :class:`LiveStage` (module, optimizer, the
micro-batches in flight). The tasks of :mod:`daskdist.worker.stage_tasks`
and :mod:`daskdist.worker.owned_stages` find them here; a finished fit's
stages are dropped (:func:`drop_run`) unless the fit keeps them for the
fitted estimator (:data:`kept`).
"""

from __future__ import annotations

import threading

from ..errors import StateLost
from ..spec import ModelSpec
from .runtime import on_drop_run, worker_address
from .stages import StageLayout, build_stage

__all__ = ["LiveStage", "stages", "lock", "kept", "find", "keep_stages", "drop_run"]

#: ``(run_id, replica, stage)`` -> :class:`LiveStage`, on this worker process.
stages: dict = {}
#: Guards :data:`stages`.
lock = threading.Lock()
#: Runs whose stages outlive the fit (the fitted estimator predicts with them).
kept: set = set()


class LiveStage:
    """A stage's live module and optimizer on a worker, and its micro-batches in flight."""

    def __init__(self, spec: ModelSpec, layout: StageLayout, random_state: int | None = None):
        self.spec, self.layout = spec, layout
        self.device = spec.device_here()
        self.module, self.optimizer = build_stage(spec, layout, random_state)
        self.params = list(self.module.parameters())
        self.lock = threading.Lock()
        self.saved: dict = {}  # micro-batch -> (input, output) of its forward pass
        self.saved_bytes: dict = {}  # micro-batch -> bytes autograd saved for its backward
        self.round: int | None = None  # the round whose step the stage is at
        self.attempt: str | None = None  # the driver's attempt at the epoch it loaded
        self.records: list = []  # the epoch's round log (replica 0, stage 0)
        self.skipped = 0

    def at(self, round_: int, attempt: str, what: str) -> None:
        """Raise ``StateLost`` unless the stage is at ``round_`` of the driver's ``attempt``.

        A task of an attempt that the driver gave up (a worker was lost, the
        epoch runs again) may still start after the new attempt loaded the
        stage: it must not touch it.
        """
        if self.attempt != attempt:
            raise StateLost(f"Stage {self.layout.index} was loaded for attempt {self.attempt}, "
                            f"not {attempt} ({what}): this task's attempt was given up.")
        if self.round != round_:
            raise StateLost(
                f"Stage {self.layout.index} is at round {self.round}, not {round_}, on this "
                f"worker ({what}): its state was lost with a worker or a task ran twice.")


def find(run_id: str, replica: int, stage: int) -> LiveStage:
    """The stage on this worker, or ``StateLost`` when it is not here."""
    found = stages.get((run_id, replica, stage))
    if found is None:
        raise StateLost(f"Stage {stage} of pipeline replica {replica} is not on this worker "
                        "(its worker was lost).")
    return found


def keep_stages(run_id: str, grid, dask_worker=None) -> int:
    """Drop this worker's stages of ``run_id`` that ``grid`` no longer places here.

    Run on every worker (``Client.run``) when a recovery moved stages, so
    that a worker does not hold a stage it gave up until the fit ends.
    Returns how many were dropped.
    """
    here = dask_worker.address if dask_worker is not None else worker_address()
    with lock:
        gone = [k for k in stages if k[0] == run_id
                and not (k[1] < len(grid) and k[2] < len(grid[k[1]])
                         and grid[k[1]][k[2]] == here)]
        for k in gone:
            del stages[k]
    return len(gone)


@on_drop_run
def drop_run(run_id: str) -> int:
    """Free the stages of a finished fit on this worker; return how many were dropped."""
    with lock:
        keys = [k for k in stages if k[0] == run_id and run_id not in kept]
        for k in keys:
            del stages[k]
    return len(keys)
