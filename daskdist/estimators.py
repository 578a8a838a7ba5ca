"""``DaskNeuralNetClassifier`` and ``DaskNeuralNetRegressor``.

skorch estimators whose ``fit`` trains one replica per Dask worker and whose
``predict`` runs block-wise on the workers for dask inputs. See
:class:`daskdist.net.DaskNet` for what acts where.
"""

from __future__ import annotations

import dask.array as da
import numpy as np
import torch
from skorch import NeuralNetClassifier, NeuralNetRegressor
from skorch.dataset import ValidSplit

from .net import DaskNet

__all__ = ["DaskNeuralNetClassifier", "DaskNeuralNetRegressor"]

_DASK_PARAMS_DOC = """
    Other Parameters
    ----------------
    strategy : str or daskdist.strategies.Strategy (default="sync")
        How replicas synchronise: ``"sync"`` (average gradients every step;
        equals single-process training on the global batch), ``"local_sgd"``
        (``sync_every`` local steps, then average parameters),
        ``"hierarchical"`` (``local_sgd`` averaged within groups of replicas,
        by default per host, then across groups), ``"async"`` (each replica's
        update applied as it arrives; no replica waits), ``"ssp"`` (``async``
        with replicas at most ``strategy__staleness`` rounds apart),
        ``"ddp"`` (``sync``'s maths in a torch.distributed process group),
        ``"pipeline"`` (the model's stages on different workers) or
        ``"diloco"`` (``sync_every`` inner steps, then an outer Nesterov SGD
        step on the mean parameter change: ``strategy__outer_lr``,
        ``strategy__outer_momentum``, ``strategy__nesterov``). Options
        of a strategy are set with ``strategy__<option>``
        (``strategy__compression`` and ``strategy__density`` for ``sync``,
        ``local_sgd`` and ``hierarchical``, ``strategy__deadline`` for
        ``sync`` and ``local_sgd``, ``strategy__groups``,
        ``strategy__staleness``, ``strategy__n_stages``...); see
        :mod:`daskdist.strategies`.
    sync_every : int (default=8)
        Local steps between averages, for strategies that take it.
    sharding : {"random", "sequential", "stratified"} (default="random")
        How samples are split into one shard per replica.
    n_replicas : int or None (default=None)
        Replicas; default one per worker, following the workers as they join
        and leave (``elastic``). Several replicas may share a worker.
    elastic : bool (default=True)
        Follow the cluster's workers between epochs: replicas are added on
        workers that joined (unless ``n_replicas`` is given, when they only
        take replicas doubled up on one worker) and merged away from workers
        that left gracefully, moving only the rows that must move; False
        keeps the replicas where the fit placed them. See docs/elastic.md.
    max_replicas : int or None (default=None)
        The most replicas an elastic fit uses, however many workers join.
    scheduler_address : str or None (default=None)
        Scheduler to connect to. If None, the current ``distributed`` client is
        used, and if there is none, a local cluster is started for the fit and
        closed after it.
    random_state : int or None (default=None)
        Seed of shard plans, per-epoch shuffles and per-round torch seeds.
    preprocessor : fitted transformer or callable or None (default=None)
        Applied to each shard's features on its worker, and to ``X`` before
        prediction.
    sample_dim : str or None (default=None)
        For xarray inputs: the dimension that indexes samples; default the
        first dimension. See :mod:`daskdist.data.inputs`.
    features : list of str or None (default=None)
        For Dataset and DataFrame inputs: the feature variables or columns;
        default all but the target (``y`` may name the target).
    streaming : {"auto", True, False} (default="auto")
        For dask, xarray and Zarr inputs: stream each shard chunk by chunk on
        its worker instead of keeping it in worker memory, for data larger
        than the workers' memory. ``"auto"`` streams when a worker's shards
        would take more than half its memory limit (config
        ``daskdist.shards.stream-above``). See :mod:`daskdist.data.streaming`.
    buffer_chunks : int (default=4)
        Streaming only: chunks whose rows are shuffled together (with
        ``iterator_train__shuffle=True``); a worker holds about
        ``buffer_chunks + 1`` chunks per replica.
    precision : {None, "bf16", "fp16"} (default=None)
        Train the forward pass and loss under ``torch.autocast`` in bfloat16
        or float16 (with a dynamic loss scale per replica); None trains in
        float32. The parameters, optimizer state and what is averaged stay
        float32. See :mod:`daskdist.worker.devices`.
    gradient_clip : float or None (default=None)
        Clip the gradient of every step to this (Euclidean) norm, on the
        workers: under ``sync`` and ``ddp`` the averaged gradient of the
        global batch, under ``local_sgd`` and relatives each replica's own.
        The same as skorch's ``GradientNormClipping`` callback, which is
        honoured too. See docs/skorch.md.
    accumulate_steps : int (default=1)
        Micro-batches of ``batch_size`` samples whose gradients add up to
        one optimizer step: a step sees ``batch_size * accumulate_steps``
        samples, while a worker holds the activations of one micro-batch at
        a time. Steps per epoch count optimizer steps
        (``net.steps_per_epoch_``).

    ``device`` is where the workers train: ``"cuda"`` gives each worker its
    own GPU (workers of one host take its GPUs in turn); a worker without
    CUDA trains on its CPU, with a warning. The estimator's own module stays
    on the client's CPU when the client has no GPU.

    ``batch_size`` is the global batch per step, split across replicas.

    Fitted attributes added to skorch's: ``rounds_`` (a DataFrame, one row per
    synchronisation round: replicas, samples, loss, bytes, synchronisation and
    compute seconds), ``steps_per_epoch_`` (optimizer steps in an epoch, what a
    per-step schedule counts: ``OneCycleLR(total_steps=max_epochs *
    steps_per_epoch_)``), ``recoveries_`` (one row per recovery from a lost
    worker) and ``dashboard_link_`` (the address of the run's ``/daskdist``
    page on the scheduler's dashboard, or None).
"""


class DaskNeuralNetClassifier(DaskNet, NeuralNetClassifier):
    __doc__ = (
        "NeuralNetClassifier trained data-parallel on a Dask cluster.\n\n"
        "Labels may be any sortable values; they are encoded on the workers and\n"
        "``predict`` returns them. ``classes`` fixes them, in its order (output\n"
        "column ``i`` is ``classes[i]``); ``classes=[]``, as in skorch, means that\n"
        "``y`` already holds class indices and the net has no ``classes_``. A\n"
        "module class that takes ``n_outputs`` gets the number of classes when\n"
        "none is given.\n" + _DASK_PARAMS_DOC
        + NeuralNetClassifier.__doc__
    )
    _skorch_base = NeuralNetClassifier
    _classifier = True

    def __init__(self, module, *args, criterion=torch.nn.NLLLoss,
                 train_split=ValidSplit(5, stratified=True),  # noqa: B008 - skorch's default
                 classes=None, strategy="sync",
                 sync_every=8, sharding="random", n_replicas=None, elastic=True,
                 max_replicas=None, scheduler_address=None, random_state=None,
                 preprocessor=None, sample_dim=None, features=None,
                 streaming="auto", buffer_chunks=4, precision=None,
                 gradient_clip=None, accumulate_steps=1, use_caching=False, **kwargs):
        super().__init__(module, *args, criterion=criterion, train_split=train_split,
                         classes=classes, use_caching=use_caching, **kwargs)
        self._init_dask_params(strategy, sync_every, sharding, n_replicas, scheduler_address,
                               random_state, preprocessor, sample_dim, features, streaming,
                               buffer_chunks, precision, gradient_clip, accumulate_steps,
                               elastic, max_replicas)

    def _set_target_info(self, y, classes, found=None) -> None:
        if found is not None:
            found = np.unique(found)
        elif isinstance(y, da.Array):
            found = np.unique(np.asarray(da.unique(y).compute()))
        else:
            found = np.unique(y)
        if self._in_partial_fit_:
            known = self._class_labels()
            unknown = (np.setdiff1d(found, known) if known is not None
                       else found[(found < 0) | (found >= self._n_outputs_)])
            if len(unknown):
                raise ValueError(f"y has labels {unknown.tolist()} not seen in the first fit "
                                 f"({_describe_classes(known, self._n_outputs_)}).")
            return
        if self.classes is not None:  # the estimator's parameter, as skorch reads it
            self._check_given_classes(np.asarray(self.classes), found)
        elif classes is not None:  # partial_fit(classes=...): every label, on the first call
            self._check_given_classes(np.unique(np.asarray(classes)), found)
            found = np.unique(np.asarray(classes))
        elif len(found) < 2:
            raise ValueError(f"Classifier can't train when only one class is present: {found}.")
        self.classes_inferred_ = found
        labels = self._class_labels()
        self._n_outputs_ = len(labels) if labels is not None else int(found.max()) + 1

    def _check_given_classes(self, classes: np.ndarray, found: np.ndarray) -> None:
        """Refuse targets that ``classes`` cannot encode (before any work is sent)."""
        if not len(classes):  # skorch's classes=[]: y holds class indices already
            if found.dtype.kind not in "iub" or (len(found) and found.min() < 0):
                raise ValueError(
                    "classes=[] means that y holds class indices 0, 1, ...; got labels "
                    f"{found[:10].tolist()}. Pass the labels as classes=[...] instead.")
            return
        if len(np.unique(classes)) != len(classes):
            raise ValueError(f"classes must name each class once, got {classes.tolist()}.")
        unknown = np.setdiff1d(found, classes)
        if len(unknown):
            raise ValueError(f"y has labels {unknown[:10].tolist()} that are not in "
                             f"classes={classes.tolist()}.")

    def _class_labels(self):
        """The class labels (output column ``i`` is label ``i``); None for ``classes=[]``."""
        if self.classes is not None and not len(self.classes):
            return None
        return np.asarray(self.classes_)

    def _shard_kwargs(self) -> dict:
        return {**super()._shard_kwargs(), "classes": self._class_labels(),
                "y_dtype": np.int64}

    def predict_proba(self, X):
        """Class probabilities (module output after ``predict_nonlinearity``).

        numpy in → numpy out, computed here; dask array in → dask array out,
        computed block-wise by whatever scheduler is current.
        """
        X, labels = self._predict_input(X)
        if isinstance(X, da.Array):
            out = self._blockwise(X, "predict_proba", (self._n_outputs_,), np.float32)
        else:
            out = self._local_proba(X)
        return labels.wrap(out, columns=self._class_labels(), column_dim="class")

    def predict(self, X):
        """Predicted class labels (the original labels; indices with ``classes=[]``)."""
        X, labels = self._predict_input(X)
        classes = self._class_labels()
        if isinstance(X, da.Array):
            dtype = classes.dtype if classes is not None else np.dtype(np.int64)
            out = self._blockwise(X, "predict", (), dtype)
        else:
            index = self._local_proba(X).argmax(axis=1)
            out = classes[index] if classes is not None else index
        return labels.wrap(out)


class DaskNeuralNetRegressor(DaskNet, NeuralNetRegressor):
    __doc__ = (
        "NeuralNetRegressor trained data-parallel on a Dask cluster.\n\n"
        "A 1-d ``y`` is trained as one output column and predicted as 1-d. A module\n"
        "class that takes ``n_outputs`` gets the number of target columns when\n"
        "none is given.\n" + _DASK_PARAMS_DOC + NeuralNetRegressor.__doc__
    )
    _skorch_base = NeuralNetRegressor

    def __init__(self, module, *args, criterion=torch.nn.MSELoss, strategy="sync",
                 sync_every=8, sharding="random", n_replicas=None, elastic=True,
                 max_replicas=None, scheduler_address=None, random_state=None,
                 preprocessor=None, sample_dim=None, features=None,
                 streaming="auto", buffer_chunks=4, precision=None,
                 gradient_clip=None, accumulate_steps=1, use_caching=False, **kwargs):
        super().__init__(module, *args, criterion=criterion, use_caching=use_caching, **kwargs)
        self._init_dask_params(strategy, sync_every, sharding, n_replicas, scheduler_address,
                               random_state, preprocessor, sample_dim, features, streaming,
                               buffer_chunks, precision, gradient_clip, accumulate_steps,
                               elastic, max_replicas)

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.target_tags.multi_output = True
        return tags

    def _set_target_info(self, y, classes, found=None) -> None:
        if self.sharding == "stratified":
            raise ValueError("sharding='stratified' needs class labels; use it with a classifier.")
        n_out = 1 if y.ndim == 1 else int(y.shape[1])
        if self._in_partial_fit_ and n_out != self._n_outputs_:
            raise ValueError(f"y has {n_out} target columns; the first fit had "
                             f"{self._n_outputs_}.")
        self.y_ndim_ = y.ndim
        self._n_outputs_ = n_out

    def _shard_kwargs(self) -> dict:
        return {**super()._shard_kwargs(), "y_dtype": np.float32, "y_2d": True}

    def predict(self, X):
        """Predicted targets; 1-d when the model was fitted on a 1-d ``y``.

        numpy in → numpy out; dask array in → dask array out, computed
        block-wise by whatever scheduler is current; xarray and dataframes
        in → the same, labelled like the input (:mod:`daskdist.data.inputs`).
        """
        X, labels = self._predict_input(X)
        flat = getattr(self, "y_ndim_", 2) == 1
        if isinstance(X, da.Array):
            shape = () if flat else (self._n_outputs_,)
            return labels.wrap(self._blockwise(X, "predict", shape, np.float32))
        out = self._local_proba(X)
        return labels.wrap(out.reshape(-1) if flat and out.ndim == 2 and out.shape[1] == 1
                           else out)

    def predict_proba(self, X):
        """The module's output (as skorch's ``NeuralNetRegressor``)."""
        X, labels = self._predict_input(X)
        if isinstance(X, da.Array):
            return labels.wrap(self._blockwise(X, "predict_proba", (self._n_outputs_,),
                                               np.float32))
        return labels.wrap(self._local_proba(X))


def _describe_classes(classes, n_outputs: int) -> str:
    """The classes of a fit, for an error message."""
    if classes is None:
        return f"class indices 0..{n_outputs - 1}"
    return f"classes: {classes.tolist()}"
