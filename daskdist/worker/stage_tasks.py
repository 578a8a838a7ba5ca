"""The worker side of pipeline parallelism: a stage's module, micro-batches in and out.

Each task here runs on the worker that holds one stage of one pipeline
replica (``strategy="pipeline"``, :mod:`daskdist.strategies.pipeline`). The
worker keeps the stage's live module and optimizer in a cache keyed by
``(run, replica, stage)``, with the autograd graphs of the micro-batches whose
backward pass has not come back yet — GPipe's stored activations (Huang et al.
2019). What travels between stages through Dask is small: a micro-batch's
activations forward (:class:`Activation`), the gradient with respect to them
backward (:class:`Backward`). Under ``precision="bf16"`` both travel as
bfloat16 (:class:`BFloat16Array`), the dtype autocast gave them: half the
bytes of float32, and the values the unsplit model would pass on.

Within an epoch a stage is stateful: a step's tasks check the round its stage
is at and raise :class:`~daskdist.worker.replica.StateLost` when it is not there (a
worker that restarted, a task that ran twice), so that the driver runs the
epoch again from its starting state rather than training on a wrong one.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from ..dashboard.events import emit_from_worker, round_event
from ..errors import StateLost
from ..seeds import seed_for
from ..spec import ModelSpec
from ..state import (
    buffers_to_numpy,
    copy_flat,
    grads_finite,
    load_buffers,
    mean_flat_into,
    optimizer_state_from_numpy,
    optimizer_state_to_numpy,
    read_tensor,
)
from .aggregation import check_non_finite
from .devices import autocast, seed_generators, to_device
from .runtime import worker_address
from .stage_cache import LiveStage, drop_run, keep_stages
from .stage_cache import find as _stage
from .stage_cache import lock as _stages_lock
from .stage_cache import stages as _stages
from .stages import StageLayout, StagePart
from .stepping import clip_gradients, set_hyper

__all__ = ["Activation", "BFloat16Array", "Backward", "SavedActivations", "StageGradient",
           "load_stage",
           "step_batch", "forward", "backward", "stage_gradient", "update", "export_stage",
           "keep_stages", "drop_run"]



@dataclass(frozen=True, eq=False)
class BFloat16Array:
    """A bfloat16 tensor between stages, as its raw 16-bit patterns (numpy has no bfloat16)."""

    bits: np.ndarray  # int16, the tensor's shape

    @property
    def nbytes(self) -> int:
        """Bytes of the array data (2 per entry)."""
        return int(self.bits.nbytes)


def to_wire(tensor: torch.Tensor):
    """``tensor`` as it travels to another stage: bfloat16 stays bfloat16, else float32."""
    tensor = tensor.detach().cpu()
    if tensor.dtype == torch.bfloat16:
        return BFloat16Array(tensor.view(torch.int16).numpy())
    return tensor.float().numpy()


def from_wire(array) -> torch.Tensor:
    """The tensor :func:`to_wire` sent (a view of the received data)."""
    if isinstance(array, BFloat16Array):
        return read_tensor(array.bits).view(torch.bfloat16)
    return read_tensor(array)


@dataclass
class Activation:
    """A micro-batch on its way forward: a stage's output (and the targets, for the last)."""

    x: np.ndarray | BFloat16Array | None
    y: np.ndarray | None
    rows: int
    worker: str | None
    bytes_moved: int
    t_start: float
    compute_s: tuple  # seconds each stage spent on this micro-batch so far
    saved_bytes: tuple  # each stage's saved activations after its forward pass of it

    def __sizeof__(self) -> int:
        return object.__sizeof__(self) + _nbytes(self.x) + _nbytes(self.y)


@dataclass
class Backward:
    """A micro-batch on its way back: the gradient of the loss with respect to a stage's input.

    ``finite``: the loss and every later stage's gradients were finite.
    The first stage's message carries no gradient; it is what the step's
    updates read (rows, loss, whether to step, the micro-batch's traffic and
    time in each stage).
    """

    grad: np.ndarray | BFloat16Array | None
    rows: int
    loss_sum: float
    finite: bool
    worker: str | None
    bytes_moved: int
    t_start: float
    compute_s: tuple
    saved_bytes: tuple

    def __sizeof__(self) -> int:
        return object.__sizeof__(self) + _nbytes(self.grad)


@dataclass
class StageGradient:
    """A stage's gradient of one step on one replica, for its peers in other replicas."""

    vector: np.ndarray
    worker: str | None

    def __sizeof__(self) -> int:
        return object.__sizeof__(self) + self.vector.nbytes


def _nbytes(array) -> int:
    return 0 if array is None else int(array.nbytes)


def load_stage(spec: ModelSpec, part: StagePart, *, run_id: str, replica: int,
               layout: StageLayout, round: int, attempt: str) -> int:
    """Load a stage's part of the epoch's starting state; return the round it is at.

    The ``daskdist-stage-load`` task. The stage is built on first use, and
    again when the fit's stage specification changed.
    """
    key = (run_id, replica, layout.index)
    with _stages_lock:
        stage = _stages.get(key)
        if stage is None or stage.spec is not spec:
            stage = _stages[key] = LiveStage(spec, layout)
    with stage.lock, torch.no_grad():
        copy_flat(stage.params, part.params)
        load_buffers(stage.module, part.buffers)
        optimizer_state_from_numpy(stage.optimizer, part.optimizer)
        # (what a given-up attempt accumulated must not add to this one's gradients)
        stage.optimizer.zero_grad(set_to_none=True)
        stage.saved.clear()
        stage.saved_bytes.clear()
        stage.records, stage.skipped, stage.round = [], part.skipped, round
        stage.attempt = attempt
    return round


def step_batch(shard, plan):
    """``(X, y)`` of a replica's slice of one step's batch (``None`` once the shard is used up)."""
    return next(iter(shard.batches(plan)), None)


def _micro(batch, micro: int, n_micro: int):
    """Micro-batch ``micro`` of ``n_micro`` of a step's batch (nearly equal parts)."""
    if batch is None:
        return None, None
    X, y = batch
    X = X.tensor_split(n_micro)[micro]
    y = None if y is None else y.tensor_split(n_micro)[micro]
    return X, y


def _arrive(message, size: int) -> int:
    """Bytes moved so far, counting ``size`` more when ``message`` came from another worker."""
    here = worker_address()
    return message.bytes_moved + (size if message.worker not in (None, here) else 0)


def _add(times: tuple, stage: int, seconds: float) -> tuple:
    return times[:stage] + (times[stage] + seconds,) + times[stage + 1:]


class SavedActivations:
    """Count the bytes autograd saves for a backward pass (``saved_tensors_hooks``).

    Used as a context manager around a stage's forward pass. Parameters
    (and views of them, as ``Linear`` saves its weight) are not counted:
    they are held anyway. A tensor saved twice (a ``Tanh`` output that the
    next ``Linear`` saves as its input) counts once.
    """

    def __init__(self, params):
        self.skip = {p.data_ptr() for p in params}
        self.seen: set = set()
        self.nbytes = 0
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, _unpack)

    def _pack(self, tensor):
        key = (tensor.data_ptr(), tensor.numel(), tensor.dtype)
        if key[0] not in self.skip and key not in self.seen:
            self.seen.add(key)
            self.nbytes += tensor.numel() * tensor.element_size()
        return tensor

    def __enter__(self):
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        return self._hooks.__exit__(*exc)


def _unpack(tensor):
    return tensor


def forward(spec: ModelSpec, source, ready: int, after=None, *, run_id: str, replica: int,
            stage: int, n_stages: int, micro: int, n_micro: int, plan, step_rows: int,
            attempt: str):
    """A stage's forward pass of one micro-batch.

    The ``daskdist-stage-forward`` task. ``source`` is the step's batch (the
    first stage) or the previous stage's :class:`Activation`; ``ready`` the
    round the stage's last update left it at; ``after``, under the ``1f1b``
    schedule, the stage's backward pass of an earlier micro-batch that must
    end first (only its order matters). The last stage also computes
    the loss, scaled by the micro-batch's share of the step's rows
    (``step_rows``, over every replica), and its backward pass, and returns
    the first :class:`Backward`; the others keep the autograd graph for the
    backward pass and return their :class:`Activation`. Both carry, for each
    stage, the bytes of activations it held saved right after this
    micro-batch's forward pass: its peak, since only forward passes add.
    """
    t_start = time.time()
    state = _stage(run_id, replica, stage)
    if ready != plan.round:
        raise StateLost(f"Stage {stage} got the token of round {ready} in round {plan.round}.")
    first, last = stage == 0, stage == n_stages - 1
    if first:
        X, y = _micro(source, micro, n_micro)
        moved, t_first, times = 0, t_start, (0.0,) * n_stages
        held = (0,) * n_stages
        X = None if X is None or not len(X) else X
    else:
        X = None if source.x is None else from_wire(source.x)
        y = None if source.y is None else read_tensor(source.y)
        moved = _arrive(source, _nbytes(source.x) + _nbytes(source.y))
        t_first, times, held = source.t_start, source.compute_s, source.saved_bytes
    here = worker_address()
    if X is None:  # an empty micro-batch (the replica's slice is smaller than n_micro)
        if last:
            return Backward(None, 0, 0.0, True, here, moved, t_first, times, held)
        return Activation(None, None, 0, here, moved, t_first, times, held)
    device = state.device
    t0 = time.perf_counter()
    with state.lock:
        state.at(plan.round, attempt, "forward")
        seed_generators(seed_for(plan.random_state, 3, plan.round, replica, stage, micro),
                        device)
        state.module.train()
        x = to_device(X, device)
        if not first:
            x.requires_grad_(True)
        with autocast(spec.precision, device), SavedActivations(state.params) as saved:
            out = state.module(x)
            if last:
                loss = spec.loss(out, to_device(y, device))
        state.saved_bytes[micro] = saved.nbytes
        held = _add(held, stage, sum(state.saved_bytes.values()))
        if not last:
            state.saved[micro] = (x, out)
            times = _add(times, stage, time.perf_counter() - t0)
            return Activation(to_wire(out), None if y is None else y.numpy(), len(X), here,
                              moved, t_first, times, held)
        del state.saved_bytes[micro]  # (the last stage's backward pass follows at once)
        rows = len(X)
        loss_sum = float(loss.item()) * rows
        finite = bool(np.isfinite(loss_sum))
        if finite:
            (loss * (rows / step_rows)).backward()
            finite = grads_finite(state.params)
        grad = to_wire(x.grad) if finite and not first else None
    times = _add(times, stage, time.perf_counter() - t0)
    return Backward(grad, rows, loss_sum, finite, here, moved, t_first, times, held)


def backward(spec: ModelSpec, message: Backward, *, run_id: str, replica: int, stage: int,
             micro: int, plan, attempt: str) -> Backward:
    """A stage's backward pass of one micro-batch, from the next stage's :class:`Backward`.

    The ``daskdist-stage-backward`` task: accumulates the stage's parameter
    gradients and returns the gradient with respect to its input (none for
    the first stage).
    """
    state = _stage(run_id, replica, stage)
    moved = _arrive(message, _nbytes(message.grad))
    here = worker_address()
    times, finite = message.compute_s, message.finite
    t0 = time.perf_counter()
    with state.lock:
        state.at(plan.round, attempt, "backward")
        saved = state.saved.pop(micro, None)
        state.saved_bytes.pop(micro, None)
        if message.rows and saved is None:
            raise StateLost(f"Stage {stage} holds no forward pass of micro-batch {micro} of "
                            f"round {plan.round}.")
        grad = None
        if saved is not None and finite:
            x, out = saved
            out.backward(from_wire(message.grad).to(out.device, out.dtype))
            finite = grads_finite(state.params)
            if finite and stage:
                grad = to_wire(x.grad)
    times = _add(times, stage, time.perf_counter() - t0)
    return Backward(grad, message.rows, message.loss_sum, finite, here, moved,
                    message.t_start, times, message.saved_bytes)


def stage_gradient(spec: ModelSpec, *after, run_id: str, replica: int, stage: int,
                   plan, attempt: str) -> StageGradient:
    """A stage's accumulated gradient of one step (after its backward passes ``after``)."""
    state = _stage(run_id, replica, stage)
    with state.lock:
        state.at(plan.round, attempt, "gradient")
        vector = torch.nn.utils.parameters_to_vector(
            [p.grad if p.grad is not None else torch.zeros_like(p) for p in state.params])
    return StageGradient(vector.detach().cpu().numpy(), worker_address())


def update(spec: ModelSpec, *inputs, run_id: str, replica: int, stage: int, plan,
           n_replicas: int, n_micro: int, extra_bytes: int, attempt: str) -> int:
    """A stage's optimizer step at the end of a step; return the round it is then at.

    The ``daskdist-stage-update`` task. ``inputs`` are the first stage's
    :class:`Backward` of every micro-batch of every replica (they say
    whether the step is finite, and that every backward pass is done), then,
    with several replicas, every replica's :class:`StageGradient` of this
    stage, summed into the gradient (each is already scaled by its rows'
    share of the step). A step whose loss or gradients were not finite on any
    replica is skipped by every stage of every replica. Replica 0's first
    stage logs the round and counts skipped steps
    (``daskdist.driver.max-non-finite``).
    """
    state = _stage(run_id, replica, stage)
    messages = inputs[:n_replicas * n_micro]
    gradients = inputs[n_replicas * n_micro:]
    finite = all(m.finite for m in messages)
    with state.lock:
        state.at(plan.round, attempt, "update")
        if finite:
            set_hyper(state.optimizer, plan)
            if gradients:
                for p in state.params:
                    if p.grad is None:
                        p.grad = torch.zeros_like(p)
                with torch.no_grad():
                    mean_flat_into([p.grad for p in state.params],
                                   [g.vector for g in gradients], [1.0] * len(gradients))
            clip_gradients(spec, state.params)  # by value: norm clipping spans the stages
            state.optimizer.step()
        state.optimizer.zero_grad(set_to_none=True)
        state.saved.clear()
        state.saved_bytes.clear()
        state.round = plan.round + 1
        if replica == 0 and stage == 0:
            _log_step(state, plan, messages, n_micro, finite, extra_bytes)
    return plan.round + 1


def _log_step(state: LiveStage, plan, messages, n_micro: int, finite: bool,
              extra_bytes: int) -> None:
    """Record a step in the epoch's round log (and count it if skipped)."""
    per_replica, bad = [], []
    for r in range(len(messages) // n_micro):
        own = messages[r * n_micro:(r + 1) * n_micro]
        rows = sum(m.rows for m in own)
        compute = max(sum(m.compute_s[s] for m in own) for s in range(len(own[0].compute_s)))
        per_replica.append((r, float(sum(m.loss_sum for m in own)), rows, float(compute)))
        if not all(m.finite for m in own):
            bad.append(r)
    live = tuple(r for r, _, rows, _ in per_replica if rows)
    if not finite:
        state.skipped = check_non_finite(state.skipped, tuple(bad) or live, plan, count=1)
    record = {
        "round": plan.round, "epoch": plan.epoch,
        "replicas": live if finite else (), "skipped": () if finite else (tuple(bad) or live),
        "samples": sum(rows for r, _, rows, _ in per_replica if r in live) if finite else 0,
        "steps": 1,
        "loss_sum": sum(loss for _, loss, _, _ in per_replica) if finite else 0.0,
        "bytes": int(sum(m.bytes_moved for m in messages) + extra_bytes),
        # the busiest stage's compute: the rest of the step is the pipeline's bubble and
        # the tasks' overhead
        "compute_s": max(c for _, _, _, c in per_replica),
        # each stage's peak of saved activations in the step, over the replicas
        "activation_bytes": tuple(max(m.saved_bytes[s] for m in messages)
                                  for s in range(len(messages[0].saved_bytes))),
        "t_start": min(m.t_start for m in messages), "t_end": time.time(),
        "per_replica": tuple(per_replica),
    }
    state.records.append(record)
    emit_from_worker(round_event(plan.run_id, record))


def export_stage(spec: ModelSpec, ready: int, *, run_id: str, replica: int, stage: int,
                 round: int, attempt: str, tensors: bool = True) -> StagePart:
    """A stage's part of the state at the end of an epoch (with the log, for the first).

    Without ``tensors`` (stages that keep their own state), only the log and
    the count of skipped steps.
    """
    state = _stage(run_id, replica, stage)
    with state.lock, torch.no_grad():
        state.at(round, attempt, "end of epoch")
        if not tensors:
            return StagePart(stage, np.zeros(0, np.float32), {}, {}, tuple(state.records),
                             state.skipped)
        params = torch.nn.utils.parameters_to_vector(state.params).detach().cpu().numpy()
        return StagePart(stage, params.copy(), buffers_to_numpy(state.module),
                         optimizer_state_to_numpy(state.optimizer), tuple(state.records),
                         state.skipped)
