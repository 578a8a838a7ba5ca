"""The estimator's side of a model whose state lives in its pipeline stages.

With ``strategy="pipeline", strategy__build="workers"`` the client never
holds the model's parameters: ``module_`` is built on torch's ``meta``
device (shapes only), each stage is built and trained on its worker
(:mod:`daskdist.worker.owned_stages`), and after the fit the stages stay
there, placed as ``stages_`` says. Prediction flows through them
(:meth:`StagedModel._staged_output`); :meth:`StagedModel.gather_module`
brings the whole model back on purpose, where the client has the memory.

:class:`StagedModel` also owns how the estimator's ``module_`` and the
fit's :class:`~daskdist.state.TrainingState` turn into each other, which is
where the two kinds of fit differ.
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from dataclasses import dataclass

import dask
import dask.array as da
import numpy as np
import torch

from .state import (
    TrainingState,
    load_params,
    module_to_state,
    optimizer_state_from_numpy,
)
from .worker import owned_stages

__all__ = ["StagePlacement", "StagedModel", "stage_client"]

_clients: dict = {}  # scheduler address -> the client that predicts through stages there


def stage_client(address: str | None):
    """A client of the cluster that holds a fitted model's stages, kept for the process.

    The current client when it talks to ``address`` (or no address is
    given); otherwise one opened once per scheduler and kept, since the
    futures of a dask prediction live as long as the client that made them.
    """
    from distributed import Client, get_client

    try:
        current = get_client()
    except ValueError:
        current = None
    if current is not None and address in (None, current.scheduler.address):
        return current
    if address is None:
        raise ValueError("The fitted stages live on a cluster this process has no client of: "
                         "make a Client of it current, or set scheduler_address.")
    client = _clients.get(address)
    if client is None or client.status not in ("running", "connecting"):
        client = _clients[address] = Client(address, set_as_default=False)
    return client


@dataclass(frozen=True)
class StagePlacement:
    """Where a fitted model's stages live (the estimator's ``stages_``).

    Attributes
    ----------
    run_id : str
        The fit whose stages these are (their key in each worker's cache).
    workers : tuple of str
        The worker of each stage of the first pipeline (the one that predicts).
    children : tuple of tuple of str
        Each stage's units, by their paths in the model.
    n_params : tuple of int
        Each stage's parameter count.
    """

    run_id: str
    workers: tuple
    children: tuple
    n_params: tuple

    @property
    def n_stages(self) -> int:
        """How many stages the model is cut into."""
        return len(self.workers)


class StagedModel:
    """Mixin of :class:`~daskdist.net.DaskNet`: state to module and back, in either kind of fit."""

    def _builds_on_workers(self) -> bool:
        return bool(getattr(self.get_strategy(), "holds_state", False))

    @contextlib.contextmanager
    def _module_home(self):
        """Build ``module_`` on ``meta`` (and keep skorch from moving it) for stage-built fits."""
        if not self._builds_on_workers():
            yield
            return
        from .worker.stage_build import check_buildable, on_meta

        if isinstance(self.module, torch.nn.Module) and not on_meta(self.module):
            check_buildable(self.module)  # (refuses it, before skorch moves it to meta)
        requested, self.device = self.device, "meta"
        try:
            with torch.device("meta"):
                yield
        finally:
            self.device = requested

    def _held_in_stages(self) -> bool:
        """Whether ``module_`` holds no data (its state lives in pipeline stages)."""
        from .worker.stage_build import on_meta

        return getattr(self, "module_", None) is not None and on_meta(self.module_)

    def _current_state(self) -> TrainingState:
        prev = getattr(self, "_training_state_", None)
        counters = ({} if prev is None
                    else {"step": prev.step, "round": prev.round, "epoch": prev.epoch,
                          "skipped": prev.skipped, "log": prev.log, "cursors": prev.cursors,
                          "own": prev.own, "outer": prev.outer})
        if self._held_in_stages():
            return TrainingState(params=np.zeros(0, np.float32), buffers={}, optimizer={},
                                 **counters)
        return module_to_state(self.module_, self.optimizer_, **counters)

    def _load_state(self, state: TrainingState) -> None:
        if state.params.size or not self._held_in_stages():
            load_params(self.module_, state.params, state.buffers)
            optimizer_state_from_numpy(self.optimizer_, state.optimizer)
        self._training_state_ = state

    # -- the stages after the fit -------------------------------------------------------------
    def _check_stage_home(self, client, embedded: bool, strategy=None) -> None:
        """Before a stage-built fit: what it needs; and let go of the last fit's stages.

        A cluster that outlives the fit, no round checkpoints, and a start:
        the model's initial values, or a sharded checkpoint to resume from.
        """
        previous = getattr(self, "_training_state_", None)
        if (self._builds_on_workers() and previous is not None and previous.round
                and getattr(strategy, "restore", None) is None):
            raise ValueError(
                "A fit with strategy__build='workers' continues only from a sharded checkpoint "
                "(its stages' values live on the workers of the fit that made them): use "
                "fit(X, y, resume=path) rather than warm_start or partial_fit.")
        self._release_stages(client)
        if not self._builds_on_workers():
            return
        from skorch.callbacks import Initializer

        from .callbacks import Checkpoint

        callbacks = [cb for _, cb in getattr(self, "callbacks_", ())]
        if any(isinstance(cb, Checkpoint) and cb.every_rounds for cb in callbacks):
            raise ValueError(
                "Checkpoint(every_rounds=...) saves states between rounds; stages built on "
                "their workers (strategy__build='workers') are saved at epoch ends: use "
                "Checkpoint(every=...).")
        if any(isinstance(cb, Initializer) for cb in callbacks):
            raise ValueError(
                "An Initializer callback sets values in module_, which for stages built on "
                "their workers (strategy__build='workers') holds none: give the layers a "
                "reset_parameters() that initialises them as you want.")
        if embedded:
            raise ValueError(
                "strategy__build='workers' leaves the fitted stages on the cluster's workers, "
                "and this fit would start a cluster of its own that closes with it: give a "
                "scheduler_address (or make a Client current) of a cluster that stays up.")

    def _note_stages(self, trainer) -> None:
        """After an epoch of a stage-built fit: where its stages are (for callbacks)."""
        if not getattr(trainer.strategy, "holds_state", False):
            return
        grid, layouts = trainer.strategy.placement(trainer.scratch)
        self._fit_strategy_ = trainer.strategy  # (a sharded checkpoint tells it, see Resumable)
        self.stages_ = StagePlacement(
            trainer.run_id, tuple(grid[0]), tuple(x.children for x in layouts),
            tuple(x.n_params for x in layouts))

    def _keep_stages(self, client, trainer, finished: bool) -> None:
        """At a stage-built fit's end: keep its stages on their workers, if it finished.

        A fit that failed or was interrupted lets them go (the driver drops
        them), since they may be rounds apart.
        """
        if not getattr(trainer.strategy, "holds_state", False):
            return
        self._fit_strategy_ = None
        if not finished:
            self.stages_ = None
            return
        self._note_stages(trainer)
        client.run(owned_stages.keep_run, trainer.run_id)

    def _release_stages(self, client=None) -> None:
        placement = getattr(self, "stages_", None)
        if placement is None:
            return
        self.stages_ = None
        client = client or stage_client(self.scheduler_address)
        client.run(owned_stages.release_run, placement.run_id, on_error="ignore")

    def release_stages(self) -> None:
        """Free the fitted stages on the workers (the estimator can no longer predict)."""
        self._release_stages()

    def _placement(self) -> StagePlacement:
        placement = getattr(self, "stages_", None)
        if placement is None:
            from sklearn.exceptions import NotFittedError

            raise NotFittedError(
                f"This {type(self).__name__} was fitted with strategy__build='workers', and "
                "its stages are gone from the workers (released, or a fit that did not "
                "finish): fit it again.")
        return placement

    def _stage_chain(self, client, source, placement, **kwargs):
        for s, worker in enumerate(placement.workers):
            source = client.submit(
                owned_stages.infer, source, run_id=placement.run_id, replica=0, stage=s,
                n_stages=placement.n_stages, workers=[worker], allow_other_workers=False,
                pure=False, **kwargs)
        return source

    def _predict_rows(self) -> int:
        rows = self.get_params_for("iterator_valid").get("batch_size", self.batch_size)
        return rows if rows and rows > 0 else self.batch_size

    def _staged_output(self, X: np.ndarray) -> np.ndarray:
        """The model's output for in-memory ``X``, flowed through the stages."""
        placement = self._placement()
        client = stage_client(self.scheduler_address)
        batches = owned_stages.input_batches(X, self._predict_rows())
        out = self._stage_chain(client, batches, placement).result()
        return self._get_predict_nonlinearity()(torch.from_numpy(out)).numpy()

    def _finish_output(self, proba: np.ndarray, method: str) -> np.ndarray:
        """The model's output (after the nonlinearity) as ``method`` returns it."""
        if method == "predict_proba":
            return proba
        if self._classifier:
            index, classes = proba.argmax(axis=1), self._class_labels()
            return classes[index] if classes is not None else index
        flat = getattr(self, "y_ndim_", 2) == 1 and proba.ndim == 2 and proba.shape[1] == 1
        return proba.reshape(-1) if flat else proba

    def _staged_blockwise(self, X: da.Array, method: str, out_shape: tuple, dtype) -> da.Array:
        """``method`` of every block of a dask ``X``, each block through the stages.

        The blocks' work starts now, on the cluster; the result is a dask
        array of those futures.
        """
        placement, rows = self._placement(), self._predict_rows()
        X = X.rechunk({i: -1 for i in range(1, X.ndim)})
        blocks, client = [], stage_client(self.scheduler_address)
        for block, n in zip(X.to_delayed().ravel(), X.chunks[0]):
            batches = client.compute(dask.delayed(owned_stages.input_batches)(block, rows))
            out = self._stage_chain(client, batches, placement)
            out = client.submit(_finish_block, out, self._get_predict_nonlinearity(),
                                self._finish_output, method, pure=False)
            blocks.append(da.from_delayed(out, (n, *out_shape), dtype=dtype))
        return da.concatenate(blocks) if blocks else da.zeros((0, *out_shape), dtype=dtype)

    def gather_module(self) -> torch.nn.Module:
        """The whole fitted model, its stages' tensors brought to the client.

        For a fit with ``strategy__build="workers"``, whose ``module_`` holds
        no data; warns with the model's size, since the client needs the
        memory of the whole model. Returns a new module on the CPU
        (``module_`` stays on ``meta``); for another fit, ``module_`` itself.
        """
        if not self._held_in_stages():
            return self.module_
        placement = self._placement()
        nbytes = sum(p.numel() * p.element_size() for p in self.module_.parameters())
        warnings.warn(f"gather_module() brings {nbytes / 2**20:.0f} MiB of parameters (and "
                      "the buffers) to the client.", UserWarning, stacklevel=2)
        client = stage_client(self.scheduler_address)
        parts = client.gather([
            client.submit(owned_stages.stage_tensors, placement.run_id, 0, s,
                          workers=[w], allow_other_workers=False, pure=False)
            for s, w in enumerate(placement.workers)])
        module = copy.deepcopy(self.module_).to_empty(device="cpu")
        merged = {name: torch.from_numpy(value) for part in parts for name, value in part.items()}
        module.load_state_dict(merged, strict=True)
        return module


def _finish_block(out: np.ndarray, nonlinearity, finish, method: str) -> np.ndarray:
    """A block's output as ``predict_proba`` or ``predict`` returns it."""
    return finish(nonlinearity(torch.from_numpy(out)).numpy(), method)
