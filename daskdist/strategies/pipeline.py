"""``pipeline``: pipeline (model) parallelism, GPipe or 1F1B, through Dask tasks.

The model, a :class:`torch.nn.Sequential` or a module whose ``stages()`` method
returns its units in order, is cut into ``n_stages`` stages of consecutive
units (:mod:`daskdist.worker.stages`), each trained on a worker of its own;
a worker holds only its stage's parameters and optimizer state. Every
step, each replica's slice of the global batch is cut into
``n_micro_batches`` micro-batches that flow forward through the stages and
whose gradients flow back, as tasks pinned to the stages' workers
(:mod:`daskdist.worker.stage_tasks`): while stage 2 works on micro-batch 1, stage 1
already works on micro-batch 2. When every micro-batch is back, each stage
takes one optimizer step with its accumulated gradient (Huang et al. 2019,
"GPipe"). Dask's scheduler runs the schedule: a task starts as soon as its
micro-batch arrives and its worker is free.

Under GPipe's schedule a stage may run every forward pass of a step before
the first backward pass comes back, so it holds the activations of up to
``n_micro_batches`` micro-batches. ``schedule="1f1b"`` (one forward, one
backward: PipeDream-flush, Narayanan et al. 2021) makes stage ``s`` of ``S``
wait, before the forward pass of micro-batch ``m``, for its backward pass of
micro-batch ``m - (S - s)``: a task dependency, so the stage never holds more
than ``S - s`` micro-batches of activations, whatever ``n_micro_batches``.
The arithmetic is the same, so both schedules take the same steps.

The micro-batches' losses are scaled by their share of the step's rows, so
the accumulated gradient is that of the whole batch's mean loss, and a step
equals one of the unsplit model (``sync``) to float tolerance, for modules
without batch statistics (batch normalisation sees micro-batches) and without
dropout (its masks are drawn per stage and micro-batch).

With more workers than stages, the strategy also runs data parallelism:
``n_replicas`` pipelines (by default ``n_workers // n_stages``), each on its
own workers and its own shard of the data; after the backward passes, every
stage sums its peers' gradients of the same stage (they are already scaled by
their rows' share) before the step, so every pipeline takes the same step.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass

from ..driver.driven import DrivenEpoch
from ..errors import StateLost
from ..worker import owned_stages, stage_tasks
from ..worker.stage_build import check_buildable
from ..worker.stages import StageLayout, finish_stages, plan_stages, split_state, stage_spec
from .base import Strategy

__all__ = ["Pipeline", "PipelineEpoch", "stage_grid"]


def stage_grid(replica_workers: list, workers: list, n_stages: int) -> list[list[str]]:
    """The worker of each stage of each replica: ``grid[replica][stage]``.

    A replica's first stage sits with its shard (``replica_workers``); the
    later stages go to the workers that hold no first stage, then round the
    cluster again, so that with ``n_replicas * n_stages`` workers each worker
    holds one stage.
    """
    firsts = list(replica_workers)
    others = [w for w in workers if w not in firsts] + list(dict.fromkeys(firsts))
    grid, c = [], 0
    for first in firsts:
        row = [first]
        for _ in range(1, n_stages):
            row.append(others[c % len(others)])
            c += 1
        grid.append(row)
    return grid


@dataclass
class _Fit:
    """What a pipeline fit sends once: the stages' layouts and specification futures."""

    layouts: list[StageLayout]
    specs: list
    grid: list | None = None  # the workers of the last epoch's stages


class Pipeline(Strategy):
    """Pipeline parallelism: the model's stages on different workers, micro-batches between.

    For models too large for one worker's memory (or device): each worker
    holds one stage's parameters and optimizer state. A step costs two
    messages per micro-batch and stage boundary (activations forward,
    gradients back) and ``2 * n_micro_batches * n_stages`` small Dask tasks
    per replica, so it pays off for models whose stages compute for much
    longer than a task takes (milliseconds); the pipeline's bubble, the time
    stages wait at the start and end of each step, is about
    ``(n_stages - 1) / (n_micro_batches + n_stages - 1)`` of it.

    Parameters
    ----------
    n_stages : int
        Stages the model is cut into.
    n_micro_batches : int
        Micro-batches each replica's slice of a step is cut into (more: a
        smaller bubble, more and smaller tasks).
    split_points : list of int, optional
        Indices of the units at which stages 2, 3, ... begin (default:
        stages with about equal parameter counts).
    schedule : {"gpipe", "1f1b"}
        The order of a stage's forward and backward passes: ``"gpipe"``
        lets a stage hold every micro-batch's activations of a step;
        ``"1f1b"`` at most ``n_stages - s`` on stage ``s`` (peak memory per
        stage: ``rounds_["activation_bytes"]``).
    build : {"client", "workers"}
        Where the model's tensors are made. ``"client"``: the estimator
        builds the model, the state is cut into stages at each epoch's start
        and put together at its end. ``"workers"``: the client plans the
        stages on the ``meta`` device (no parameter data), each stage's
        worker builds and initialises its stage
        (:mod:`daskdist.worker.stage_build`), and the training state stays
        in the stages, across epochs and after the fit: for models that do
        not fit one worker or the client. Hold-out scores and predictions
        then flow through the stages.

    Notes
    -----
    With ``build="client"`` the state is whole only at epoch ends, so round
    checkpoints (``every_rounds``) are taken there; if a worker is lost, the
    epoch in progress runs again from its starting state on the remaining
    workers, and hold-out scores and ``predict`` run the whole model on one
    worker. With ``build="workers"`` nothing holds a second copy of a stage:
    after a lost worker the epoch runs again with every stage rebuilt from
    its initial values (first epoch) or the sharded checkpoint of the
    epoch's start, and stops the fit (:class:`~daskdist.errors.StagesLost`)
    without one.
    """

    name = "pipeline"

    def elastic_refusal(self) -> str | None:
        return ("strategy='pipeline' keeps its stages on the workers it placed them on; "
                "workers that join are used by the next fit")

    #: The schedules a stage's passes may follow.
    schedules = ("gpipe", "1f1b")

    #: Where the model's tensors may be made.
    builds = ("client", "workers")
    #: A sharded checkpoint's index to restore stages from (``fit(resume=...)``, set by
    #: the estimator); stages built on workers read their tensors from its files.
    restore = None

    def __init__(self, n_stages: int = 2, n_micro_batches: int = 4, split_points=None,
                 schedule: str = "gpipe", build: str = "client"):
        self.n_stages = n_stages
        self.n_micro_batches = n_micro_batches
        self.split_points = split_points
        self.schedule = schedule
        self.build = build
        self.validate()

    @property
    def holds_state(self) -> bool:
        """Whether the training state lives in the stages (``build="workers"``)."""
        return self.build == "workers"

    def in_flight(self, stage: int) -> int | None:
        """Micro-batches stage ``stage`` may hold activations of (None: every one of a step)."""
        return self.n_stages - stage if self.schedule == "1f1b" else None

    def validate(self) -> None:
        for name in ("n_stages", "n_micro_batches"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}.")
        if self.split_points is not None:
            points = list(self.split_points)
            if len(points) != self.n_stages - 1:
                raise ValueError(
                    f"split_points {points} give {len(points) + 1} stages, but "
                    f"n_stages={self.n_stages}.")
        if self.schedule not in self.schedules:
            raise ValueError(f"schedule must be one of {list(self.schedules)}, got "
                             f"{self.schedule!r}.")
        if self.build not in self.builds:
            raise ValueError(f"build must be one of {list(self.builds)}, got {self.build!r}.")

    def round_sizes(self, steps_per_epoch: int) -> list[int]:
        return [1] * steps_per_epoch

    def replicas_for(self, n_workers: int) -> int:
        return max(1, n_workers // self.n_stages)

    def place_replicas(self, workers: list, n: int) -> list:
        return [workers[(i * self.n_stages) % len(workers)] for i in range(n)]

    def check_model(self, spec) -> None:
        if spec.precision == "fp16":
            raise ValueError(
                "strategy='pipeline' does not train in precision='fp16' (its stages would "
                "need one loss scale between them); use precision='bf16'.")
        plan_stages(spec, self.n_stages, self.split_points)
        if self.holds_state:
            check_buildable(spec.module)

    @staticmethod
    def placement(scratch: dict) -> tuple[list, list]:
        """``(grid, layouts)`` of the fit's stages: ``grid[replica][stage]`` is a worker."""
        fit = scratch["fit"]
        return fit.grid, fit.layouts

    def train_epoch(self, ctx) -> None:
        """Run one epoch of pipelined steps."""
        PipelineEpoch(self, ctx).run()


def _identity(x):
    return x


class PipelineEpoch(DrivenEpoch):
    """The driver's side of one ``pipeline`` epoch."""

    def __init__(self, strategy: Pipeline, ctx):
        super().__init__(strategy, ctx)
        self.settled = 0

    def drive(self) -> None:
        ctx, info = self.ctx, self.ctx.info
        steps = info.steps_per_epoch - info.done
        if steps <= 0:
            ctx.finish(ctx.state, info.round)
            return
        fit = self._fit()
        # stale tasks of an attempt given up must not touch the stages this one loads
        self.ids = {"run_id": info.run_id, "attempt": f"{info.attempt}-{info.round}"}
        self.grid = stage_grid(info.replica_workers, ctx.live_workers(), self.strategy.n_stages)
        if fit.grid is not None and fit.grid != self.grid:  # (a recovery moved stages)
            ctx.client.run(stage_tasks.keep_stages, info.run_id, self.grid, on_error="ignore")
        fit.grid = self.grid
        ready = self._load(fit)
        last = self._steps(fit, ready, steps)
        self._finish(fit, last, steps)

    def _fit(self) -> _Fit:
        """The fit's stage layouts and specification futures (sent again if lost)."""
        ctx, s = self.ctx, self.strategy
        fit = ctx.scratch.get("fit")
        if fit is None:
            layouts = plan_stages(ctx.info.model, s.n_stages, s.split_points)
            fit = ctx.scratch["fit"] = _Fit(layouts, [None] * len(layouts))
        for i, layout in enumerate(fit.layouts):
            if fit.specs[i] is None or fit.specs[i].status in ("lost", "cancelled"):
                fit.specs[i] = ctx.submit(
                    _identity, stage_spec(ctx.info.model, layout), worker=None, queue=False,
                    key=f"daskdist-stage-spec-{ctx.info.attempt}-{i}")
        return fit

    def _pinned(self, func, *args, key, worker, **kwargs):
        return self.hold(self.ctx.submit(func, *args, key=key, worker=worker, queue=False,
                                         strict=True, **kwargs))

    def _restore(self, round_: int) -> dict | None:
        """The sharded checkpoint to read missing stages from: only at the round it saved."""
        restore = self.strategy.restore
        return restore if restore is not None and restore["round"] == round_ else None

    def _load(self, fit: _Fit) -> list[list]:
        """Send each stage its part of the epoch's starting state; the stages' ready tokens."""
        ctx, info = self.ctx, self.ctx.info
        if self.strategy.holds_state:
            fresh = info.start.round == 0 and info.start.step == 0
            return [[self._pinned(owned_stages.own_stage, fit.specs[s], **self.ids, replica=i,
                                  layout=fit.layouts[s], round=info.round, fresh=fresh,
                                  restore=self._restore(info.round),
                                  random_state=info.random_state,
                                  key=ctx.key("stage-own", info.round, i, s),
                                  worker=self.grid[i][s])
                     for s in range(len(fit.layouts))]
                    for i in range(len(self.grid))]
        parts = [self.hold(ctx.submit(split_state, ctx.state, layout, worker=None, queue=False,
                                      key=ctx.key("stage-split", layout.index)))
                 for layout in fit.layouts]
        return [[self._pinned(stage_tasks.load_stage, fit.specs[s], parts[s], **self.ids,
                              replica=i, layout=fit.layouts[s], round=info.round,
                              key=ctx.key("stage-load", info.round, i, s),
                              worker=self.grid[i][s])
                 for s in range(len(fit.layouts))]
                for i in range(len(self.grid))]

    def _steps(self, fit: _Fit, ready, steps: int):
        """Submit and follow the epoch's steps; return the last step's ready tokens."""
        ctx, info = self.ctx, self.ctx.info
        per_flush = max(1, info.lookahead // 2)
        base = list(self.held)
        inflight = []
        for n in range(steps):
            k = info.done + n
            ready = self._submit_step(fit, ready, k, info.round + n, first=(n == 0))
            inflight.append(ready[0][0])
            if (n + 1) % per_flush == 0 or n == steps - 1:
                ready, inflight = ctx.flush((ready, inflight), strict=True)
                self.held = [*base, *(f for row in ready for f in row), *inflight]
                while len(inflight) > info.lookahead or (n == steps - 1 and inflight):
                    self._settle(inflight.pop(0))
        return ready

    def _submit_step(self, fit: _Fit, ready, k: int, round_: int, first: bool):
        """Queue one step's tasks on every replica; return its update tokens."""
        ctx, info = self.ctx, self.ctx.info
        S, M = self.strategy.n_stages, self.strategy.n_micro_batches
        D = len(self.grid)
        sizes, batches = info.shard_sizes, info.replica_batch
        step_rows = sum(max(0, min(batches[i], sizes[i] - k * batches[i])) for i in range(D))
        plans = [ctx.plan(i, round=round_, first_step=k, n_steps=1) for i in range(D)]
        heads, grads = [], [[None] * D for _ in range(S)]
        for i, plan in enumerate(plans):
            row = self.grid[i]
            batch = ctx.submit(stage_tasks.step_batch, ctx.shards[i], plan,
                               key=ctx.key("stage-batch", round_, i), worker=row[0])
            backs = [[None] * M for _ in range(S)]  # backs[s][m]: stage s's output going back
            for m in range(M):
                message = batch
                for s in range(S):
                    window = self.strategy.in_flight(s)
                    after = backs[s][m - window] if window and m >= window else None
                    message = ctx.submit(
                        stage_tasks.forward, fit.specs[s], message, ready[i][s], after,
                        **self.ids,
                        replica=i, stage=s, n_stages=S, micro=m, n_micro=M, plan=plan,
                        step_rows=step_rows, key=ctx.key("stage-forward", round_, i, s, m),
                        worker=row[s])
                backs[S - 1][m] = message
                for s in range(S - 2, -1, -1):
                    backs[s][m] = ctx.submit(
                        stage_tasks.backward, fit.specs[s], backs[s + 1][m], **self.ids,
                        replica=i, stage=s, micro=m, plan=plan,
                        key=ctx.key("stage-backward", round_, i, s, m), worker=row[s])
            heads.extend(backs[0])
            if D > 1:
                for s in range(S):
                    grads[s][i] = ctx.submit(
                        stage_tasks.stage_gradient, fit.specs[s], *backs[s], **self.ids,
                        replica=i, stage=s, plan=plan, key=ctx.key("stage-grad", round_, i, s),
                        worker=row[s])
        extra = self._exchange_bytes(fit) + (info.start.nbytes * D if first else 0)
        return [[ctx.submit(stage_tasks.update, fit.specs[s], *heads,
                            *(grads[s] if D > 1 else ()), **self.ids, replica=i, stage=s,
                            plan=plans[i], n_replicas=D, n_micro=M,
                            extra_bytes=extra if (i, s) == (0, 0) else 0,
                            key=ctx.key("stage-update", round_, i, s), worker=self.grid[i][s])
                 for s in range(S)] for i in range(D)]

    def _exchange_bytes(self, fit: _Fit) -> int:
        """Bytes of one step's gradient exchange between replicas of the same stages."""
        itemsize = self.ctx.info.start.params.dtype.itemsize
        D = len(self.grid)
        return sum(layout.n_params * itemsize
                   for s, layout in enumerate(fit.layouts)
                   for i in range(D) for j in range(D)
                   if self.grid[i][s] != self.grid[j][s])

    def _stage_workers(self) -> dict:
        return {f"stage {s} of replica {i}": worker
                for i, row in enumerate(self.grid) for s, worker in enumerate(row)}

    def _settle(self, future) -> None:
        """Wait for a step's update, watching the stages' workers; raise what failed."""
        self.wait_alive(future, self._stage_workers())
        if future.status == "error" and isinstance(future.exception(), StateLost):
            self.ctx.lost(str(future.exception()), self.settled)
        if future.status == "error":
            raise future.exception()
        if future.status != "finished":
            self.check_alive(self._stage_workers())
            self.ctx.lost(f"the pipeline's step output {future.key} was lost with a worker",
                          self.settled)
        self.settled += 1

    def check_alive(self, workers: dict) -> None:
        """As :meth:`DrivenEpoch.check_alive`, counting the steps this attempt loses."""
        live = set(self.ctx.live_workers())
        for what, worker in workers.items():
            if worker not in live:
                self.ctx.lost(f"worker {worker} ({what}) left", self.settled)

    def _finish(self, fit: _Fit, ready, steps: int) -> None:
        """Gather the stages' parts into the epoch's final state."""
        ctx, info = self.ctx, self.ctx.info
        end = info.round + steps
        parts = [self._pinned(stage_tasks.export_stage, fit.specs[s], ready[0][s],
                              **self.ids, replica=0, stage=s, round=end,
                              tensors=not self.strategy.holds_state,
                              key=ctx.key("stage-export", end, s), worker=self.grid[0][s])
                 for s in range(len(fit.layouts))]
        plan = ctx.plan(0, round=info.round, first_step=info.done, n_steps=steps,
                        max_non_finite=None)
        final = self.hold(ctx.submit(
            finish_stages, ctx.state, *parts, layouts=fit.layouts, plan=plan,
            key=ctx.key("average", end), worker=self.grid[0][0], queue=False))
        self._settle(final)
        ctx.track(end, final)
        ctx.finish(final, end)
