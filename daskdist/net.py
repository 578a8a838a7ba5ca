"""The skorch skin over the engine: fit, partial_fit and predict on a Dask cluster.

:class:`DaskNet` is mixed into skorch's estimators. skorch stays the surface —
parameters, callbacks, history, pickling — while each epoch's batches run in
the lean replica loop on the workers (see :mod:`daskdist.worker.replica`). Which
skorch parameters act where is checked by :meth:`DaskNet.check_worker_support`
before anything is sent to the cluster.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import warnings

import dask.array as da
import numpy as np
import pandas as pd
import torch
from distributed import span
from skorch.callbacks import (
    EpochScoring,
    EpochTimer,
    Initializer,
    PassthroughScoring,
    PrintLog,
)
from skorch.dataset import Dataset
from skorch.net import NeuralNet

from . import interrupt
from ._compat import workers as cluster_workers
from .callbacks import Checkpoint as SafetensorsCheckpoint
from .checkpoint import load_checkpoint
from .clusters.embedded import cluster_client, held_cluster
from .dashboard.reporter import FitReporter
from .data.indexed import DatasetSource, IndexedInput, check_dataset, reads_by_index
from .data.inputs import to_arrays
from .data.named import check_named, is_named, n_rows, take
from .data.shards import takes_indices
from .data.sources import ShardOptions
from .data.torch_datasets import unpack_dataset
from .data.validation import check_features, check_sample_weight, check_targets, scan_dask_values
from .driver.membership import check_params as check_membership_params
from .driver.trainer import RECOVERY_COLUMNS, ROUND_COLUMNS, Trainer
from .dry_pass import check_output_width, materialise_lazy
from .epoch_history import record_epoch
from .keras_models import as_torch_module, keras_seeded
from .predict import Predicting, skorch_device
from .resumable import Resumable
from .schedules import EpochSchedules, batch_schedulers, steps_done
from .seeds import seed_for, seeded_torch
from .spec import ModelSpec
from .staged import StagedModel
from .state import params_vector
from .step_callbacks import clip_options
from .strategies import resolve_strategy
from .worker.devices import check_precision
from .worker_support import WorkerSupport

__all__ = ["DaskNet"]

class DaskNet(WorkerSupport, Resumable, Predicting, StagedModel):
    """Mixin: distributed training for a skorch ``NeuralNet`` subclass.

    Adds the parameters ``strategy``, ``sync_every``, ``sharding``,
    ``n_replicas``, ``scheduler_address``, ``random_state``, ``preprocessor``,
    ``sample_dim``, ``features``, ``streaming`` and ``buffer_chunks``, plus
    ``strategy__<option>`` routing.
    """

    prefixes_ = [*NeuralNet.prefixes_, "strategy"]
    #: Base skorch class whose per-batch methods are the reference.
    _skorch_base = NeuralNet
    _classifier = False

    # -- parameters ---------------------------------------------------------------------------
    def _init_dask_params(self, strategy, sync_every, sharding, n_replicas, scheduler_address,
                          random_state, preprocessor, sample_dim=None, features=None,
                          streaming="auto", buffer_chunks=4, precision=None,
                          gradient_clip=None, accumulate_steps=1, elastic=True,
                          max_replicas=None):
        self.strategy = strategy
        self.sync_every = sync_every
        self.sharding = sharding
        self.n_replicas = n_replicas
        self.scheduler_address = scheduler_address
        self.random_state = random_state
        self.preprocessor = preprocessor
        self.sample_dim = sample_dim
        self.features = features
        self.streaming = streaming
        self.buffer_chunks = buffer_chunks
        self.precision = precision
        self.gradient_clip = gradient_clip
        self.accumulate_steps = accumulate_steps
        self.elastic = elastic
        self.max_replicas = max_replicas

    @property
    def _default_callbacks(self):
        callbacks = [
            ("epoch_timer", EpochTimer()),
            ("train_loss", PassthroughScoring(name="train_loss", on_train=True)),
            ("valid_loss", PassthroughScoring(name="valid_loss")),
        ]
        if self._classifier:
            callbacks.append(("valid_acc", PassthroughScoring(name="valid_acc",
                                                              lower_is_better=False)))
        callbacks.append(("print_log", PrintLog()))
        return callbacks

    def get_strategy(self):
        """The configured strategy object for the next fit."""
        return resolve_strategy(self.strategy, self.get_params_for("strategy"),
                                sync_every=self.sync_every)

    # -- data ---------------------------------------------------------------------------------
    def _check_fit_data(self, X, y, classes=None):
        X, y = unpack_dataset(X, y)  # TensorDataset(X, y) and skorch's Dataset: their arrays
        if reads_by_index(X):
            return check_dataset(self, X, y, classes), None
        if is_named(X):
            return self._check_named_fit_data(X, y, classes)
        X, y, labels = to_arrays(X, y, sample_dim=self.sample_dim, features=self.features)
        if classes is None and labels.classes is not None:
            classes = labels.classes  # a categorical target's categories
        self.input_features_ = labels.features
        self.target_name_ = labels.name
        X = check_features(X, n_features=self.n_features_in_ if self._fitted_before() else None,
                           estimator=type(self).__name__)
        y = check_targets(y, classifier=self._classifier, n_samples=X.shape[0])
        if X.shape[0] < 1:
            raise ValueError("Found array with 0 sample(s); at least 1 is needed to fit.")
        found = None
        if isinstance(X, da.Array):
            if isinstance(y, da.Array) and y.chunks[0] != X.chunks[0]:
                y = y.rechunk({0: X.chunks[0]})
            found = scan_dask_values(X, y, classifier=self._classifier)
        self._set_target_info(y, classes, found)
        self.n_features_in_ = X.shape[1] if X.ndim == 2 else None
        return X, y

    def _check_named_fit_data(self, X, y, classes):
        """A dict input (:mod:`daskdist.data.named`), checked before any work."""
        X = check_named(X, keys=getattr(self, "input_keys_", None) if self._fitted_before()
                        else None)
        if self.preprocessor is not None:
            raise ValueError("A preprocessor transforms one feature array; with a dict X, "
                             "preprocess each array before fit.")
        if self.get_strategy().name == "pipeline":
            raise ValueError("strategy='pipeline' passes one tensor between its stages; a "
                             "dict X needs another strategy.")
        if isinstance(y, da.Array):
            raise ValueError("With a dict X, y must be in memory (a numpy array) too.")
        y = check_targets(y, classifier=self._classifier, n_samples=n_rows(X))
        self.input_features_, self.target_name_ = None, None
        self._set_target_info(y, classes)
        self.input_keys_ = sorted(X)
        self.n_features_in_ = None
        return X, y

    def _fitted_before(self) -> bool:
        return (self.warm_start or getattr(self, "_in_partial_fit_", False)) and hasattr(
            self, "n_features_in_")

    def _set_target_info(self, y, classes, found=None) -> None:
        """Record target facts; ``found`` are the classes of a scanned dask ``y``."""

    def _shard_kwargs(self) -> dict:
        return {"preprocessor": self.preprocessor, "x_dtype": np.float32,
                "index_features": takes_indices(self.module_)}

    # -- fit ----------------------------------------------------------------------------------
    def initialize_module(self):
        """Build ``module_``, passing ``n_outputs`` from the data when the module takes it.

        With ``random_state`` set, the initial weights are seeded from it. The
        round and epoch counters start again from zero.
        """
        self._training_state_ = None  # fresh weights: counters start again
        kwargs = self.get_params_for("module")
        n_out = getattr(self, "_n_outputs_", None)
        if (n_out is not None and isinstance(self.module, type) and "n_outputs" not in kwargs
                and "n_outputs" in inspect.signature(self.module).parameters):
            kwargs["n_outputs"] = n_out
        # random_state also fixes the initial weights, without touching torch's RNG
        seed = None if self.random_state is None else seed_for(self.random_state, 0)
        with seeded_torch(seed), keras_seeded(seed):
            self.module_ = as_torch_module(self.initialized_instance(self.module, kwargs), seed)
        return self

    def _initialize_module(self, reason=None):
        with skorch_device(self), self._module_home():
            return super()._initialize_module(reason)

    def _initialize_criterion(self, reason=None):
        with skorch_device(self):
            return super()._initialize_criterion(reason)

    def _get_param_names(self):
        # skorch lists every attribute without a trailing underscore; keep the
        # private bookkeeping (``_params_to_validate`` …) out of the parameters.
        return [k for k in super()._get_param_names() if not k.startswith("_")]

    def fit(self, X, y=None, resume=None, sample_weight=None, **fit_params):
        """Initialize (unless ``warm_start``) and train on the Dask cluster.

        Parameters
        ----------
        X : numpy.ndarray, dask.array.Array, dict, xarray, dataframe or torch Dataset
            Features, samples along the first axis (docs/data.md). A map-style
            ``Dataset`` of ``(features, target)`` pairs is read on the workers,
            by index (:mod:`daskdist.data.indexed`).
        y : array-like or dask.array.Array
            Targets (None beside a ``Dataset``).
        resume : str or os.PathLike, optional
            A checkpoint directory (:meth:`save_checkpoint`,
            :class:`daskdist.callbacks.Checkpoint`): continue from its epoch,
            with its parameters, optimizer state, history and random state,
            for the remaining of ``max_epochs`` epochs. The result equals an
            uninterrupted run's up to float rounding.
        sample_weight : array-like of shape (n_samples,), optional
            A non-negative weight per sample (scikit-learn's convention),
            never passed to the module: each batch's loss is the weighted mean
            of its rows' losses, and replicas are averaged by the weight they
            trained on, so that ``sync`` equals single-process weighted
            training on the combined batch. In-memory inputs only; not under
            ``ddp`` or ``pipeline``. See docs/skorch.md.
        **fit_params
            Not supported (the replicas call the module with ``X`` only).

        Returns
        -------
        self
        """
        self._in_partial_fit_ = False
        with self._cluster_for(X):
            X, y = self._check_fit_data(X, y)
            weights = self._check_weights(sample_weight, X)
            checkpoint = None if resume is None else load_checkpoint(resume)
            if not self.warm_start or not self.initialized_ or checkpoint is not None:
                self.initialize()
            self._resume_from_ = checkpoint
            return self._train(X, y, sample_weight=weights, **fit_params)

    def partial_fit(self, X, y=None, classes=None, sample_weight=None, **fit_params):
        """Continue training from the current parameters for ``max_epochs`` epochs.

        Parameters
        ----------
        X, y
            As in :meth:`fit`.
        classes : array-like, optional
            All class labels (classifiers), for the first call.
        sample_weight : array-like of shape (n_samples,), optional
            As in :meth:`fit`.

        Returns
        -------
        self
        """
        self._in_partial_fit_ = self.initialized_
        with self._cluster_for(X):
            X, y = self._check_fit_data(X, y, classes)
            weights = self._check_weights(sample_weight, X)
            if not self.initialized_:
                self.initialize()
            return self._train(X, y, sample_weight=weights, **fit_params)

    def _cluster_for(self, X):
        """One cluster for the whole fit of a Dataset read on the workers (asked first)."""
        if not reads_by_index(X):
            return contextlib.nullcontext()
        loader_processes = bool(self.get_params_for("iterator_train").get("num_workers"))
        return held_cluster(self.scheduler_address, daemon=not loader_processes)

    def _check_weights(self, sample_weight, X):
        """``sample_weight`` validated (before any work), or None."""
        if sample_weight is None:
            return None
        if isinstance(X, IndexedInput):
            raise ValueError("sample_weight is supported for in-memory inputs only; a Dataset "
                             "read on the workers carries no weights.")
        strategy = self.get_strategy()
        if strategy.name in ("ddp", "pipeline"):
            raise ValueError(
                f"sample_weight is not supported under strategy={strategy.name!r}, which plans "
                "each step's shares of the batch from row counts; use 'sync' (the same maths).")
        return check_sample_weight(sample_weight, n_samples=n_rows(X))

    def notify(self, method_name, **cb_kwargs):
        """Call ``method_name`` of the net and of every callback, as skorch does.

        Except ``on_train_begin`` of per-step ``LRScheduler`` callbacks: their
        schedulers are built for the fit by :mod:`daskdist.schedules`, from the
        steps the fit's history counts.
        """
        if method_name != "on_train_begin":
            return super().notify(method_name, **cb_kwargs)
        stepped_here = {id(cb) for _, cb in batch_schedulers(self.callbacks_)}
        getattr(self, method_name)(self, **cb_kwargs)
        for _, cb in self.callbacks_:
            if id(cb) not in stepped_here:
                getattr(cb, method_name)(self, **cb_kwargs)

    def _train(self, X, y, **fit_params):
        self.notify("on_train_begin", X=X, y=y)
        try:
            self.fit_loop(X, y, **fit_params)
        except KeyboardInterrupt:
            pass
        self.notify("on_train_end", X=X, y=y)
        return self

    def _named_classes(self) -> bool:
        """Whether the targets' classes are named (a classifier without ``classes=[]``)."""
        return self._classifier and not (self.classes is not None and not len(self.classes))

    def _model_spec(self) -> ModelSpec:
        kwargs = self.get_params_for("optimizer")
        kwargs.setdefault("lr", self.lr)
        return ModelSpec(
            module=self.module_, optimizer=self.optimizer, optimizer_kwargs=kwargs,
            criterion=self.criterion_,
            log_probs=self._classifier and isinstance(self.criterion_, torch.nn.NLLLoss),
            classifier=self._classifier, device=str(self.device),
            precision=check_precision(self.precision), accumulate=self.accumulate_steps,
            **clip_options(self),
        )

    def _lrs(self):
        lrs = tuple(g["lr"] for g in self.optimizer_.param_groups)
        return lrs if len(lrs) > 1 else lrs[0]

    def fit_loop(self, X, y=None, epochs=None, sample_weight=None, **fit_params):
        """Train ``epochs`` epochs (default ``max_epochs``) on the cluster.

        Each epoch runs as rounds on the workers; at its end the averaged
        parameters are loaded into ``module_``, the epoch is recorded in
        ``history`` and the epoch callbacks run here on the client.
        """
        if fit_params:
            raise ValueError(
                f"fit parameters {sorted(fit_params)} are not supported: replicas call the "
                "module with X only."
            )
        self.check_worker_support(reads_dataset=isinstance(X, IndexedInput))
        epochs = self.max_epochs if epochs is None else epochs
        dry = X.example if isinstance(X, IndexedInput) else X
        materialise_lazy(self, dry)
        check_output_width(self, dry)
        holdout, stratified = self._holdout()
        if self.random_state is None:
            self.random_state_ = int(np.random.SeedSequence().generate_state(1)[0] >> 1)
        else:
            self.random_state_ = int(self.random_state)
        checkpoint, self._resume_from_ = getattr(self, "_resume_from_", None), None
        if checkpoint is not None:
            epochs = max(epochs - self._resume(checkpoint), 0)
        strategy = self.get_strategy()
        source, self._stage_source_ = getattr(self, "_stage_source_", None), None
        if source is not None:  # a sharded checkpoint the stages read
            strategy.restore = source
        check_membership_params(self.elastic, self.max_replicas)
        rows = []
        with interrupt.guard(), cluster_client(self.scheduler_address) as (client, _embedded):
            self._check_stage_home(client, _embedded, strategy)
            n_replicas = self.n_replicas
            if n_replicas is None:
                n_workers = len(cluster_workers(client))
                n_replicas = max(1, min(strategy.replicas_for(n_workers), n_rows(X),
                                        self.max_replicas or n_workers))
            data = ShardOptions(sharding=self.sharding, holdout=holdout,
                                stratify=stratified and self._classifier,
                                convert=self._shard_kwargs(), streaming=self.streaming,
                                buffer_chunks=self.buffer_chunks)
            trainer = Trainer(
                client, self._model_spec(), strategy,
                batch_size=self.batch_size * self.accumulate_steps,
                n_replicas=n_replicas, random_state=self.random_state_,
                elastic=self.elastic, resize=self.n_replicas is None,
                max_replicas=self.max_replicas,
                shuffle=bool(self.get_params_for("iterator_train").get("shuffle", False)),
                data=data,
            )
            trainer.round_hooks = [
                (cb.every_rounds, functools.partial(cb.save_round, self))
                for _, cb in self.callbacks_
                if isinstance(cb, SafetensorsCheckpoint) and cb.every_rounds
            ]
            reporter = FitReporter(client, name=type(self).__name__, progress=bool(self.verbose))
            self.dashboard_link_ = reporter.link
            status = "failed"
            try:
                with span("daskdist-fit", trainer.run_id):
                    with span("data"):
                        trainer.start(DatasetSource(X) if isinstance(X, IndexedInput) else X,
                                      y, self._current_state(), sample_weight)
                    self.steps_per_epoch_ = trainer.steps_per_epoch
                    schedules = (EpochSchedules(self, trainer.spec, steps_done(self.history))
                                 if batch_schedulers(self.callbacks_) else None)
                    reporter.started(trainer, epochs)
                    self._train_epochs(trainer, reporter, epochs, rows,
                                       self._client_datasets(X, y, trainer), schedules)
                status = "finished"
            except KeyboardInterrupt:
                status = "interrupted"
                interrupt.clear()
                state = trainer.stop()
                if state is not None:
                    self._load_state(state)
                    rows.extend(r for r in trainer.round_rows(state) if r["epoch"] == trainer.epoch)
                raise
            finally:
                self._keep_stages(client, trainer, status == "finished")
                reporter.finished(status)
                self._append_log("rounds_", rows, ROUND_COLUMNS)
                self._append_log("recoveries_", trainer.recoveries, RECOVERY_COLUMNS)
                trainer.close()
        return self

    def _train_epochs(self, trainer, reporter, epochs: int, rows: list, datasets: dict,
                      schedules=None) -> None:
        """Run ``epochs`` epochs: rounds on the cluster, then history and callbacks here."""
        initializers = any(isinstance(cb, Initializer) for _, cb in self.callbacks_) and \
            not self._held_in_stages()
        for _ in range(epochs):
            before = params_vector(self.module_) if initializers else None
            self.notify("on_epoch_begin", **datasets)
            if before is not None and not np.array_equal(before, params_vector(self.module_)):
                trainer.change_state(self._current_state())  # an Initializer set them
            table = schedules.next_epoch(trainer.steps_per_epoch) if schedules else None
            with span(f"epoch-{trainer.epoch + 1}"):
                result = trainer.run_epoch(self._lrs(), table)
            rows.extend(result.rounds)
            self._load_state(result.state)
            self._note_stages(trainer)
            record_epoch(self.history, result, trainer.strategy)
            if schedules:
                schedules.epoch_done(self)
            with warnings.catch_warnings():
                # Schedulers step between epochs; the optimizer steps on the workers.
                warnings.filterwarnings("ignore", message="Detected call of `lr_sched")
                self.notify("on_epoch_end", **datasets)
            reporter.epoch(len(self.history), self.history[-1])
            if not self._held_in_stages() and not np.array_equal(params_vector(self.module_),
                                                                 result.state.params):
                trainer.change_state(self._current_state())  # a callback changed them

    def _client_datasets(self, X, y, trainer) -> dict:
        """``dataset_train``/``dataset_valid`` for epoch callbacks that score on the client."""
        needs_data = any(isinstance(cb, EpochScoring) for _, cb in self.callbacks_)
        if not needs_data:
            return {"dataset_train": None, "dataset_valid": None}
        if trainer.source.lazy:
            raise ValueError(
                "EpochScoring callbacks score on the client and need in-memory data; with a "
                "dask input or a Dataset read on the workers, use the per-worker "
                "valid_loss/valid_acc in history instead."
            )
        valid = trainer.valid_rows()
        train_rows = np.setdiff1d(np.arange(n_rows(X)), valid if valid is not None else [])
        dataset_valid = None if valid is None else Dataset(take(X, valid), y[valid])
        return {"dataset_train": Dataset(take(X, train_rows), y[train_rows]),
                "dataset_valid": dataset_valid}

    def _append_log(self, name: str, rows, columns) -> None:
        """Set the fitted table ``name`` (``rounds_``, ``recoveries_``) from this fit's rows.

        ``partial_fit`` and ``warm_start`` fits extend the previous table.
        """
        frame = pd.DataFrame(rows, columns=list(columns))
        previous = getattr(self, name, None)
        keep = self._in_partial_fit_ or self.warm_start
        if previous is not None and keep and len(previous):
            frame = pd.concat([previous, frame], ignore_index=True)
        setattr(self, name, frame)

    def __getstate__(self):
        state = super().__getstate__()
        state.pop("_in_partial_fit_", None)
        return state
