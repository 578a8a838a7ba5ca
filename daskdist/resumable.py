"""Checkpoints of an estimator: save its whole training state, and resume from one.

:class:`Resumable` (mixed into :class:`~daskdist.net.DaskNet`) writes
safetensors checkpoints (:mod:`daskdist.checkpoint`) and loads one back for
``fit(X, y, resume=path)``; skorch's pickle-based ``load_params`` is refused.
"""

from __future__ import annotations

import inspect

import numpy as np
from skorch.history import History

from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .state import TrainingState, params_vector

__all__ = ["Resumable"]


def _json_params(params: dict) -> tuple[dict, list]:
    """Split estimator parameters into JSON-representable ones and the names of the rest.

    Classes and functions are stored by import path (``{"import": "pkg.mod.Name"}``).
    """
    stored, skipped = {}, []
    for name, value in params.items():
        try:
            stored[name] = _json_value(value)
        except TypeError:
            skipped.append(name)
    return stored, sorted(skipped)


def _json_value(value):
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (list, tuple)):
        return [_json_value(v) for v in value]
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return {k: _json_value(v) for k, v in value.items()}
    if (isinstance(value, type) or inspect.isfunction(value)) and "<" not in value.__qualname__:
        return {"import": f"{value.__module__}.{value.__qualname__}"}
    raise TypeError(f"{type(value).__name__} is not JSON-representable")


class Resumable:
    """Saving and resuming the training state of a :class:`~daskdist.net.DaskNet`."""

    def load_params(self, f_params=None, f_optimizer=None, f_criterion=None, f_history=None,
                    checkpoint=None, use_safetensors=False, **kwargs):
        """Load parameters saved with ``save_params(..., use_safetensors=True)``.

        skorch's ``load_params`` reads ``torch.save`` files through pickle by
        default; daskdist refuses that and reads safetensors (and the JSON
        history) only. For a whole training state, optimizer included, use
        :meth:`save_checkpoint` and ``fit(X, y, resume=path)``.
        """
        if not use_safetensors or checkpoint is not None:
            raise ValueError(
                "daskdist loads parameters from safetensors files only "
                "(load_params(..., use_safetensors=True)): torch.load unpickles. For the whole "
                "training state use net.save_checkpoint(path) and fit(X, y, resume=path)."
            )
        return super().load_params(f_params=f_params, f_optimizer=f_optimizer,
                                   f_criterion=f_criterion, f_history=f_history,
                                   use_safetensors=True, **kwargs)

    def save_checkpoint(self, path, state: TrainingState | None = None,
                        extra: dict | None = None) -> None:
        """Write the current training state as a safetensors checkpoint, atomically.

        Parameters and buffers of ``module_``, the optimizer state, the
        round/epoch counters, ``history``, the random state and the
        estimator's JSON-representable parameters (classes and functions by
        import path) are stored; see :mod:`daskdist.checkpoint`. Callback
        internals and parameters that are neither JSON nor importable are
        not (their names are listed in the sidecar under ``not_stored``).

        A fit resumed from it (``fit(X, y, resume=path)``) continues at the
        exact round it was saved at: after the last completed epoch, or —
        saved mid-epoch (after Ctrl-C, or by ``Checkpoint(every_rounds=...)``)
        — with the next round of that epoch.

        Parameters
        ----------
        path : str or os.PathLike
            The checkpoint directory.
        state : TrainingState, optional
            The state to save instead of ``module_`` and ``optimizer_`` (a
            round's state during a fit).
        extra : dict, optional
            More JSON-representable entries for the sidecar's ``meta`` (a
            pipeline stores its configuration and metrics there).
        """
        if not self.initialized_:
            raise ValueError(f"This {type(self).__name__} has not been initialized; fit it "
                             "before saving a checkpoint.")
        params, not_stored = _json_params(self.get_params(deep=False))
        meta = {
            "estimator": f"{type(self).__module__}.{type(self).__qualname__}",
            "params": params,
            "not_stored": not_stored,
            "history": self.history.to_list(),
            "random_state": getattr(self, "random_state_", None),
            "classes": (np.asarray(self.classes_).tolist()
                        if getattr(self, "classes_", None) is not None else None),
            **(extra or {}),
        }
        state = state if state is not None else self._current_state()
        if self._held_in_stages():  # a file per stage, written by the stages' workers
            from .sharded_checkpoint import save_sharded
            from .staged import stage_client

            save_sharded(stage_client(self.scheduler_address), path, self._placement(),
                         self.module_, self.optimizer_, state, meta)
            running = getattr(self, "_fit_strategy_", None)
            if running is not None:  # a stage lost later in the fit comes back from here
                running.restore = load_checkpoint(path)[1]["shards"]
            return
        save_checkpoint(path, state, meta)

    def _resume(self, checkpoint) -> int:
        """Load a checkpoint into the initialized estimator; return the epochs it covered."""
        state, meta = checkpoint
        if "shards" in meta or self._held_in_stages():
            return self._resume_stages(state, meta)
        n_params = params_vector(self.module_).size
        if state.params.size != n_params:
            raise CheckpointError(
                f"The checkpoint holds {state.params.size} parameters but "
                f"{type(self.module_).__name__} has {n_params}: it was saved from another model."
            )
        missing = set(dict(self.module_.named_buffers())) ^ set(state.buffers)
        if missing:
            raise CheckpointError(f"The checkpoint's buffers differ from the module's: "
                                  f"{sorted(missing)}.")
        self._load_state(state)
        history = meta.get("history", [])
        while history and "train_loss" not in history[-1]:
            history = history[:-1]  # the epoch in progress: the resumed fit runs it again
        self.history_ = History(history)
        if meta.get("random_state") is not None:
            self.random_state_ = int(meta["random_state"])
        return state.epoch

    def _resume_stages(self, state: TrainingState, meta: dict) -> int:
        """Resume a fit whose stages hold their state from a sharded checkpoint."""
        if "shards" not in meta:
            raise CheckpointError(
                "This checkpoint holds the whole model in one file; a fit with "
                "strategy__build='workers' resumes from a sharded one (written by such a fit). "
                "Resume with strategy__build='client'.")
        if not self._held_in_stages():
            raise CheckpointError(
                "This checkpoint is sharded (a file per pipeline stage): resume it with "
                "strategy='pipeline', strategy__build='workers', or first merge it into one "
                "file with daskdist.sharded_checkpoint.merge_checkpoint (daskdist "
                "merge-checkpoint SRC DST).")
        model = {"params": [[n, list(p.shape)] for n, p in self.module_.named_parameters()],
                 "buffers": [[n, list(b.shape)] for n, b in self.module_.named_buffers()]}
        if model != meta["shards"]["model"]:
            raise CheckpointError(
                f"The checkpoint was saved from another model: its parameters are "
                f"{meta['shards']['model']['params'][:3]}..., the module's "
                f"{model['params'][:3]}....")
        self._stage_source_ = meta["shards"]
        meta = {k: v for k, v in meta.items() if k != "shards"}
        self._load_state(state)
        history = meta.get("history", [])
        while history and "train_loss" not in history[-1]:
            history = history[:-1]
        self.history_ = History(history)
        if meta.get("random_state") is not None:
            self.random_state_ = int(meta["random_state"])
        return state.epoch
