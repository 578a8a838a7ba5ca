"""The run folder: what a pipeline run leaves behind.

::

    runs/<name>/
      pipeline.yaml          the pipeline as run (overrides applied, defaults filled)
      checkpoint/            final state: safetensors + checkpoint.json (config and metrics)
      metrics.json           held-out scores, timings, per-epoch history
      predictions.zarr       held-out predictions (.nc for NetCDF, .parquet for tables)
      loss.png, metrics.png  per-epoch curves
      report.md              ties them together (report.html with outputs.report: html)

A folder that already holds files is not written to unless the run was asked
to overwrite (only the files above are replaced; anything else is left) or to
resume from its checkpoint.
"""

from __future__ import annotations

import html
import json
import math
import shutil
from pathlib import Path

import numpy as np
import yaml

from ..datasets import write_zarr
from .load import PipelineError

__all__ = ["OUTPUT_NAMES", "RunFolderError", "prepare_run_folder", "write_outputs"]

#: Every name a run writes in its folder.
OUTPUT_NAMES = ("pipeline.yaml", "checkpoint", "metrics.json", "predictions.zarr",
                "predictions.nc", "predictions.parquet", "loss.png", "metrics.png",
                "report.md", "report.html")
CHECKPOINT = "checkpoint"


class RunFolderError(PipelineError):
    """The run folder cannot be used as asked (it exists, or has nothing to resume)."""


def prepare_run_folder(path, pipeline_path, *, overwrite: bool = False,
                       resume: bool = False) -> Path:
    """Check and create the run folder before anything starts.

    Parameters
    ----------
    path : str or os.PathLike
        The run folder.
    pipeline_path : str or os.PathLike
        The pipeline file (named in errors).
    overwrite : bool
        Replace the outputs of an earlier run there (other files are kept).
    resume : bool
        Continue from the checkpoint of an earlier run there.

    Returns
    -------
    pathlib.Path

    Raises
    ------
    RunFolderError
        When the folder holds files and neither flag was given, or when
        ``resume`` finds no checkpoint.
    """
    path = Path(path)
    if resume:
        if not (path / CHECKPOINT / "checkpoint.json").is_file():
            raise RunFolderError(pipeline_path, "outputs.dir", f"--resume: {path} holds no "
                                 f"checkpoint ({path / CHECKPOINT}) to continue from")
        return path
    if path.exists() and not path.is_dir():
        raise RunFolderError(pipeline_path, "outputs.dir", f"{path} exists and is not a folder")
    if path.is_dir() and any(path.iterdir()):
        if not overwrite:
            raise RunFolderError(pipeline_path, "outputs.dir", f"{path} already holds a run; "
                                 "pass --overwrite to replace its outputs, --resume to continue "
                                 "from its checkpoint, or --output DIR for a new folder")
        for name in OUTPUT_NAMES:
            target = path / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
    path.mkdir(parents=True, exist_ok=True)
    return path


def write_outputs(run_dir: Path, *, pipeline, net, test, y_pred, proba, metrics: dict,
                  summary: dict) -> dict:
    """Write every output of a finished run into ``run_dir``.

    Parameters
    ----------
    run_dir : pathlib.Path
        The prepared run folder.
    pipeline : daskdist.batch.Pipeline
    net : DaskNet
        The fitted estimator.
    test : daskdist.batch.data.PipelineData
        The held-out samples (``y`` computed to numpy).
    y_pred, proba : numpy.ndarray
        Held-out predictions and, for classifiers, class probabilities.
    metrics : dict
        Held-out scores by scorer name.
    summary : dict
        Run facts for ``metrics.json`` and the report (timings, workers...).

    Returns
    -------
    dict
        Output name -> path, for the summary printed at the end.
    """
    config = pipeline.config
    files = {}
    files["pipeline"] = run_dir / "pipeline.yaml"
    with open(files["pipeline"], "w", encoding="utf-8") as f:
        yaml.safe_dump(config, f, sort_keys=False)
    history = _history_rows(net)
    record = {"pipeline": pipeline.name, "metrics": metrics, **summary, "history": history}
    files["metrics"] = run_dir / "metrics.json"
    files["metrics"].write_text(json.dumps(record, indent=1, default=_json_default) + "\n")
    files["checkpoint"] = run_dir / CHECKPOINT
    net.save_checkpoint(files["checkpoint"], extra={"pipeline": config, "metrics": metrics})
    files["predictions"] = _write_predictions(run_dir, config, test, y_pred, proba, net)
    files.update(_plot(run_dir, history, pipeline.name))
    files["report"] = _write_report(run_dir, pipeline, record, files)
    return files


# -- pieces ----------------------------------------------------------------------

_HISTORY_KEYS = ("epoch", "train_loss", "valid_loss", "valid_acc", "samples_per_sec", "rounds",
                 "dur")


def _history_rows(net) -> list:
    rows = []
    for row in net.history:
        rows.append({k: row[k] for k in _HISTORY_KEYS if k in row})
    return rows


def _write_predictions(run_dir: Path, config: dict, test, y_pred, proba, net) -> Path:
    kind = config["outputs"]["predictions"]
    if kind == "auto":
        kind = "parquet" if test.kind == "table" else "zarr"
    y_true = np.asarray(test.y)
    if kind == "parquet":
        import pandas as pd

        frame = pd.DataFrame({"row": test.rows})
        _add_columns(frame, test.target_name, y_true, y_pred)
        if proba is not None:
            for i, label in enumerate(net.classes_):
                frame[f"proba_{label}"] = proba[:, i]
        path = run_dir / "predictions.parquet"
        frame.to_parquet(path, index=False)
        return path
    dataset = _prediction_dataset(test, y_true, y_pred, proba, net)
    if kind == "netcdf":
        path = run_dir / "predictions.nc"
        dataset.to_netcdf(path)
    else:
        path = run_dir / "predictions.zarr"
        write_zarr(dataset, path, mode="w")
    return path


def _add_columns(frame, name: str, y_true, y_pred) -> None:
    if y_true.ndim == 1:
        frame[name] = y_true
        frame[f"{name}_predicted"] = y_pred.reshape(len(frame), -1)[:, 0] \
            if y_pred.ndim > 1 else y_pred
        return
    for j in range(y_true.shape[1]):
        suffix = f"_{j}" if y_true.shape[1] > 1 else ""
        frame[f"{name}{suffix}"] = y_true[:, j]
        frame[f"{name}{suffix}_predicted"] = y_pred[:, j]


def _prediction_dataset(test, y_true, y_pred, proba, net):
    import xarray as xr

    y_true = y_true.reshape(len(y_true), -1)
    y_pred = np.asarray(y_pred).reshape(len(y_true), -1)
    dims = ("sample", "output") if y_true.shape[1] > 1 else ("sample",)
    squeeze = (lambda a: a) if y_true.shape[1] > 1 else (lambda a: a[:, 0])
    name = test.target_name
    data = {name: (dims, squeeze(y_true)), f"{name}_predicted": (dims, squeeze(y_pred))}
    coords = {"row": ("sample", test.rows)}
    if proba is not None:
        data["probability"] = (("sample", "class"), proba.astype(np.float32))
        coords["class"] = np.asarray(net.classes_)
    dataset = xr.Dataset(data, coords=coords)
    if test.sample_index is not None:
        index = test.sample_index[test.rows]
        if getattr(index, "nlevels", 1) > 1:
            import pandas as pd

            index = pd.MultiIndex.from_tuples(list(index), names=index.names)
            dataset = dataset.assign_coords(
                xr.Coordinates.from_pandas_multiindex(index, "sample")).unstack("sample")
        else:
            dataset = dataset.assign_coords(sample=np.asarray(index)).rename(
                {"sample": index.name or "sample"})
    dataset.attrs["description"] = "held-out targets and predictions"
    return dataset


def _plot(run_dir: Path, history: list, title: str) -> dict:
    from matplotlib.figure import Figure

    epochs = [row["epoch"] for row in history]
    files = {}
    fig = Figure(figsize=(6, 4), layout="constrained")
    ax = fig.add_subplot()
    for key, label in (("train_loss", "training"), ("valid_loss", "validation")):
        values = [row.get(key) for row in history]
        if any(_finite(v) for v in values):
            ax.plot(epochs, [v if _finite(v) else np.nan for v in values], marker=".",
                    label=label)
    ax.set(xlabel="epoch", ylabel="loss", title=f"{title}: loss per epoch")
    ax.legend()
    files["loss_plot"] = run_dir / "loss.png"
    fig.savefig(files["loss_plot"], dpi=100)

    fig = Figure(figsize=(6, 4), layout="constrained")
    ax = fig.add_subplot()
    if any(_finite(row.get("valid_acc")) for row in history):
        ax.plot(epochs, [row.get("valid_acc", np.nan) for row in history], marker=".",
                color="tab:green", label="validation accuracy")
        ax.set_ylabel("accuracy")
        ax.legend(loc="lower left")
    rate = ax.twinx() if ax.lines else ax
    rate.plot(epochs, [row.get("samples_per_sec", np.nan) for row in history], marker=".",
              color="tab:grey", linestyle="--", label="samples/s")
    rate.set_ylabel("samples/s")
    rate.legend(loc="lower right")
    ax.set(xlabel="epoch", title=f"{title}: metrics per epoch")
    files["metrics_plot"] = run_dir / "metrics.png"
    fig.savefig(files["metrics_plot"], dpi=100)
    return files


def _write_report(run_dir: Path, pipeline, record: dict, files: dict) -> Path:
    config = pipeline.config
    lines = [
        f"# {pipeline.name}",
        "",
        config.get("description", ""),
        "",
        "| | |",
        "| --- | --- |",
        f"| data | {record.get('data', '')} |",
        f"| model | `{config['model']['module']}` {_inline(config['model']['params'])} |",
        f"| strategy | {record.get('strategy', '')} |",
        f"| cluster | {record.get('cluster', '')}, {record.get('n_workers', '?')} workers |",
        f"| epochs | {record.get('epochs', '')} |",
        f"| training time | {record.get('train_seconds', 0):.1f} s |",
        f"| throughput | {record.get('samples_per_sec', 0):.0f} samples/s |",
        f"| started from | {record.get('resumed_from') or 'scratch'} |",
        "",
        f"## Held-out scores ({record.get('n_test', '?')} samples, "
        f"split: {config['evaluate']['split']})",
        "",
        "| metric | value |",
        "| --- | --- |",
        *[f"| {name} | {value:.4f} |" for name, value in record["metrics"].items()],
        "",
        "## Curves",
        "",
        f"![loss per epoch]({files['loss_plot'].name})",
        "",
        f"![metrics per epoch]({files['metrics_plot'].name})",
        "",
        "## Files",
        "",
        f"- `{files['checkpoint'].name}/`: final parameters and optimizer state (safetensors) "
        "with a JSON sidecar of the configuration and metrics; resume or load with "
        "`net.fit(X, y, resume=...)`",
        f"- `{files['predictions'].name}`: held-out targets and predictions",
        f"- `{files['metrics'].name}`: scores, timings and per-epoch history",
        f"- `{files['pipeline'].name}`: the pipeline as run",
        "",
    ]
    text = "\n".join(lines)
    if config["outputs"]["report"] == "html":
        path = run_dir / "report.html"
        path.write_text(_markdown_to_html(text, pipeline.name))
    else:
        path = run_dir / "report.md"
        path.write_text(text)
    return path


def _markdown_to_html(text: str, title: str) -> str:
    """Render the report's small Markdown subset (headings, tables, images, lists)."""
    body, table = [], []

    def flush():
        if table:
            rows = [r for r in table if not set(r.replace("|", "").strip()) <= {"-", " "}]
            cells = ["<tr>" + "".join(f"<td>{_inline_html(c.strip())}</td>"
                                      for c in r.strip("|").split("|")) + "</tr>" for r in rows]
            body.append("<table>" + "".join(cells) + "</table>")
            table.clear()

    for line in text.splitlines():
        if line.startswith("|"):
            table.append(line)
            continue
        flush()
        if line.startswith("## "):
            body.append(f"<h2>{html.escape(line[3:])}</h2>")
        elif line.startswith("# "):
            body.append(f"<h1>{html.escape(line[2:])}</h1>")
        elif line.startswith("![") and "](" in line:
            alt, src = line[2:].split("](", 1)
            body.append(f'<p><img src="{html.escape(src.rstrip(")"))}" '
                        f'alt="{html.escape(alt)}"></p>')
        elif line.startswith("- "):
            body.append(f"<li>{_inline_html(line[2:])}</li>")
        elif line.strip():
            body.append(f"<p>{_inline_html(line)}</p>")
    flush()
    return (f"<!doctype html>\n<html><head><meta charset='utf-8'><title>{html.escape(title)}"
            f"</title></head><body>\n" + "\n".join(body) + "\n</body></html>\n")


def _inline_html(text: str) -> str:
    parts = html.escape(text).split("`")
    return "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts))


def _inline(params: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in params.items())


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")
