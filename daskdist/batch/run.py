"""Running a validated pipeline on a Dask client, from data to run folder."""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from skorch.callbacks import Callback

from .. import dashboard
from .._compat import workers as cluster_workers
from .data import load_data, split_data
from .load import Pipeline, resolve_import
from .outputs import CHECKPOINT, prepare_run_folder, write_outputs

__all__ = ["EpochProgress", "RunResult", "build_estimator", "run_pipeline"]

logger = logging.getLogger(__name__)


@dataclass
class RunResult:
    """What :func:`run_pipeline` produced.

    Attributes
    ----------
    run_dir : pathlib.Path
    metrics : dict
        Held-out scores by scorer name.
    estimator : DaskNet
        The fitted estimator.
    files : dict
        Output name -> path.
    seconds : float
        Wall time of the whole run.
    """

    run_dir: Path
    metrics: dict
    estimator: object
    files: dict
    seconds: float


class EpochProgress(Callback):
    """A progress bar over epochs with the latest losses (``tqdm``, on stderr).

    Parameters
    ----------
    total : int
        Epochs of the run.
    initial : int
        Epochs already done (a resumed run).
    file : file-like, optional
        Where the bar goes; default ``sys.stderr``.
    """

    def __init__(self, total: int, initial: int = 0, file=None):
        self.total = total
        self.initial = initial
        self.file = file

    def on_train_begin(self, net, **kwargs):
        from tqdm.auto import tqdm

        self.bar_ = tqdm(total=self.total, initial=self.initial, unit="epoch",
                         file=self.file or sys.stderr, dynamic_ncols=True)

    def on_epoch_end(self, net, **kwargs):
        row = net.history[-1]
        shown = {k: f"{row[k]:.4f}" for k in ("train_loss", "valid_loss", "valid_acc")
                 if isinstance(row.get(k), float)}
        shown["rounds"] = row.get("rounds")
        self.bar_.set_postfix(shown, refresh=False)
        self.bar_.update(1)

    def on_train_end(self, net, **kwargs):
        self.bar_.close()


def build_estimator(pipeline: Pipeline, *, preprocessor=None, callbacks=()):
    """The estimator a pipeline's ``model`` and ``train`` sections describe.

    Parameters
    ----------
    pipeline : Pipeline
    preprocessor : fitted transformer, optional
        Applied to each shard on its worker.
    callbacks : sequence of skorch callbacks
        Added to the estimator's callbacks.

    Returns
    -------
    DaskNeuralNetClassifier or DaskNeuralNetRegressor
        Not fitted.
    """
    from ..estimators import DaskNeuralNetClassifier, DaskNeuralNetRegressor

    config = pipeline.config
    params = {k: v for k, v in config["train"].items()
              if k not in ("estimator", "checkpoint_every")}
    for key, short_in in (("optimizer", "torch.optim"), ("criterion", "torch.nn")):
        if key in params:
            params[key] = resolve_import(params[key], short_in=short_in)
    params.setdefault("verbose", 0)
    module = resolve_import(config["model"]["module"], short_in="daskdist.models")
    for key, value in config["model"]["params"].items():
        params[f"module__{key}"] = tuple(value) if isinstance(value, list) else value
    cls = DaskNeuralNetClassifier if pipeline.is_classifier else DaskNeuralNetRegressor
    return cls(module, preprocessor=preprocessor, callbacks=list(callbacks), **params)


def fit_preprocessor(steps: list, X):
    """Fit the ``preprocess`` transformers on the training features.

    Dask inputs are fitted on the cluster (dask-ml transformers compute their
    statistics block-wise); the fitted pipeline is then applied to each shard
    on its worker.

    Returns
    -------
    sklearn.pipeline.Pipeline or None
    """
    if not steps:
        return None
    from sklearn.pipeline import make_pipeline

    transformers = [resolve_import(step["transformer"], short_in="dask_ml.preprocessing")(
        **step.get("params", {})) for step in steps]
    return make_pipeline(*transformers).fit(X)


def run_pipeline(pipeline: Pipeline, *, output=None, overwrite: bool | None = None,
                 resume: bool = False, cluster_name: str = "current client",
                 progress: bool = True, out=None) -> RunResult:
    """Train, evaluate and write the run folder of a pipeline.

    Runs on the current ``distributed`` client (``with client.as_current():``),
    else on an embedded local cluster started for the fit.

    Parameters
    ----------
    pipeline : Pipeline
        From :func:`daskdist.batch.load_pipeline`.
    output : str or os.PathLike, optional
        The run folder, instead of ``outputs.dir``.
    overwrite : bool, optional
        Replace an earlier run's outputs; default ``outputs.overwrite``.
    resume : bool
        Continue from the run folder's checkpoint (``train.checkpoint_every``
        writes one during training; every run writes one at the end).
    cluster_name : str
        Named in the summary and report.
    progress : bool
        Show a progress bar over epochs.
    out : file-like, optional
        Where the start and end summaries are printed; default ``sys.stdout``.

    Returns
    -------
    RunResult

    Raises
    ------
    PipelineError
        For data that does not match the pipeline, or a run folder that
        cannot be used — before training starts.
    """
    from distributed import Client

    from ..callbacks import Checkpoint

    t0 = time.perf_counter()
    out = out or sys.stdout
    config = pipeline.config
    if overwrite is None:
        overwrite = config["outputs"]["overwrite"]
    run_dir = prepare_run_folder(output or config["outputs"]["dir"], pipeline.path,
                                 overwrite=overwrite, resume=resume)
    data = load_data(pipeline)
    train, test = split_data(data, config["evaluate"], classifier=pipeline.is_classifier)
    print(f"{pipeline.name}: {data.description}; {train.n_samples} for training, "
          f"{test.n_samples} held out", file=out)
    try:
        client = Client.current(allow_global=True)
    except ValueError:
        client = None
    page = None
    if client is not None:
        n_workers = len(cluster_workers(client))
        page = dashboard.install(client)
        watch = f"watch the run at {page}" if page else f"dashboard at {client.dashboard_link}"
        print(f"{pipeline.name}: {n_workers} workers, {watch}", file=out)
    preprocessor = fit_preprocessor(config["preprocess"], train.X)
    callbacks = []
    checkpoint_dir = run_dir / CHECKPOINT
    every = config["train"].get("checkpoint_every")
    if every:
        callbacks.append(("pipeline_checkpoint", Checkpoint(checkpoint_dir, every=every)))
    max_epochs = config["train"].get("max_epochs", 10)
    done = _epochs_in(checkpoint_dir) if resume else 0
    if progress:
        callbacks.append(("progress", EpochProgress(max_epochs, initial=done)))
    net = build_estimator(pipeline, preprocessor=preprocessor, callbacks=callbacks)
    t_fit = time.perf_counter()
    net.fit(train.X, train.y, resume=checkpoint_dir if resume else None)
    train_seconds = time.perf_counter() - t_fit

    X_test = np.asarray(test.X)
    y_test = np.asarray(test.y)
    scores = _score(net, X_test, y_test, config["evaluate"]["metrics"])
    y_pred = np.asarray(net.predict(X_test))
    proba = np.asarray(net.predict_proba(X_test)) if pipeline.is_classifier else None
    history = net.history
    summary = {
        "data": data.description,
        "n_train": train.n_samples,
        "n_test": test.n_samples,
        "epochs": len(history),
        "strategy": _strategy_text(net),
        "cluster": cluster_name,
        "n_workers": n_workers if client is not None else None,
        "dashboard": page or (client.dashboard_link if client is not None else None),
        "train_seconds": train_seconds,
        "samples_per_sec": float(np.nanmean(history[:, "samples_per_sec"])),
        "rounds": int(sum(history[:, "rounds"])),
        "resumed_from": str(checkpoint_dir) if resume else None,
    }
    files = write_outputs(run_dir, pipeline=pipeline, net=net, test=replace(test, y=y_test),
                          y_pred=y_pred, proba=proba, metrics=scores, summary=summary)
    seconds = time.perf_counter() - t0
    shown = ", ".join(f"{k} {v:.4f}" for k, v in scores.items())
    print(f"{pipeline.name}: {len(history)} epochs, {summary['rounds']} rounds, "
          f"{summary['samples_per_sec']:.0f} samples/s, held-out {shown}", file=out)
    print(f"{pipeline.name}: run folder {run_dir} (report: {files['report'].name}); "
          f"total time {seconds:.1f} s", file=out)
    return RunResult(run_dir=run_dir, metrics=scores, estimator=net, files=files,
                     seconds=seconds)


def _score(net, X, y, metrics) -> dict:
    from sklearn.metrics import check_scoring

    scorer = check_scoring(net, scoring=list(metrics))
    return {name: float(value) for name, value in scorer(net, X, y).items()}


def _strategy_text(net) -> str:
    strategy = net.strategy if isinstance(net.strategy, str) else type(net.strategy).__name__
    if strategy == "local_sgd":
        return f"local_sgd (sync_every={net.sync_every})"
    return str(strategy)


def _epochs_in(checkpoint_dir: Path) -> int:
    from ..checkpoint import load_checkpoint

    state, _ = load_checkpoint(checkpoint_dir)
    return int(state.epoch)
