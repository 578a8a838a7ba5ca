"""Pipeline files: validation, data sources, run folders and resume."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from daskdist.batch import PipelineError, load_pipeline, run_pipeline
from daskdist.cli import main

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = sorted((ROOT / "pipelines").glob("*.yaml"))
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _write(tmp_path, config: dict, name="pipeline.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def _minimal(**sections) -> dict:
    config = {
        "data": {"source": "sklearn", "name": "digits"},
        "model": {"module": "MLP", "params": {"hidden": [32]}},
        "train": {"estimator": "classifier", "max_epochs": 2, "lr": 0.1, "batch_size": 64},
    }
    for key, value in sections.items():
        config[key] = value
    return config


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_pipeline_validates(path):
    pipeline = load_pipeline(path)
    assert pipeline.name == path.stem
    assert pipeline.config["outputs"]["dir"] == f"runs/{path.stem}"


def test_the_shipped_pipelines_cover_the_required_jobs():
    names = {p.stem for p in SHIPPED}
    assert {"digits-mlp", "digits-cnn", "weather-zarr"} <= names
    cnn = load_pipeline(ROOT / "pipelines/digits-cnn.yaml").config
    assert cnn["model"]["module"] == "SmallCNN" and cnn["train"]["strategy"] == "sync"
    weather = load_pipeline(ROOT / "pipelines/weather-zarr.yaml").config
    assert weather["data"]["source"] == "zarr"


# -- broken files: each names the file, the field and what was expected --------------------

BROKEN = {
    "unknown_key": (
        lambda c: c["train"].update(strategy="sync") or c.update(trian={}),
        "trian", "unknown key (did you mean 'train'?)"),
    "unknown_nested_key": (
        lambda c: c["data"].update(nmae="x"),
        "data.nmae", "unknown key"),
    "wrong_type": (
        lambda c: c["train"].update(max_epochs="ten"),
        "train.max_epochs", "expected an integer, got 'ten'"),
    "out_of_range": (
        lambda c: c["train"].update(batch_size=0),
        "train.batch_size", "expected an integer >= 1, got 0"),
    "missing_section": (
        lambda c: c.pop("model"),
        "model", "missing required field"),
    "missing_field": (
        lambda c: c["model"].pop("module"),
        "model.module", "missing required field"),
    "missing_field_for_source": (
        lambda c: c.update(data={"source": "zarr", "path": "x.zarr", "target": "t"}),
        "data.features", "missing required field"),
    "bad_enum": (
        lambda c: c["data"].update(source="hdf5"),
        "data.source", "expected one of: sklearn, synthetic"),
    "bad_import_path": (
        lambda c: c["model"].update(module="mypackage.models.Net"),
        "model.module", "import path does not resolve: cannot import 'mypackage.models'"),
    "missing_attribute": (
        lambda c: c["model"].update(module="daskdist.models.Transformer"),
        "model.module", "has no attribute 'Transformer'"),
    "not_a_module": (
        lambda c: c["model"].update(module="numpy.zeros"),
        "model.module", "is not a torch.nn.Module subclass"),
    "bad_module_params": (
        lambda c: c["model"].update(params={"hiden": [3]}),
        "model.params", "MLP takes: n_features, hidden"),
    "bad_transformer": (
        lambda c: c.update(preprocess=[{"transformer": "StandardScalar"}]),
        "preprocess[0].transformer", "dask_ml.preprocessing has no 'StandardScalar'"),
    "unknown_estimator_param": (
        lambda c: c["train"].update(max_epoch=3),
        "train.max_epoch", "unknown estimator parameter (did you mean 'max_epochs'?)"),
    "unknown_strategy": (
        lambda c: c["train"].update(strategy="ring"),
        "train.strategy",
        "expected one of: async, ddp, diloco, hierarchical, local_sgd, pipeline, ssp, sync"),
    "bad_strategy_option": (
        lambda c: c["train"].update(strategy="ssp", strategy__staleness=-1),
        "train.strategy__staleness", "staleness must be an integer >= 0"),
    "bad_optimizer": (
        lambda c: c["train"].update(optimizer="torch.optim.Adamm"),
        "train.optimizer", "has no attribute 'Adamm'"),
    "unknown_scorer": (
        lambda c: c.update(evaluate={"metrics": ["acuracy"]}),
        "evaluate.metrics[0]", "unknown scikit-learn scorer 'acuracy' (did you mean 'accuracy'?)"),
    "missing_data_file": (
        lambda c: c.update(data={"source": "npy", "path": "nowhere/X.npy",
                                 "target_path": "nowhere/y.npy"}),
        "data.path", "no such file or store: 'nowhere/X.npy'"),
    "unknown_dataset": (
        lambda c: c["data"].update(name="mnist"),
        "data.name", "expected one of: digits, iris"),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_a_broken_pipeline_names_file_field_and_expectation(tmp_path, case, capsys):
    change, field, expected = BROKEN[case]
    config = _minimal()
    change(config)
    path = _write(tmp_path, config)
    with pytest.raises(PipelineError) as info:
        load_pipeline(path)
    assert info.value.field == field
    message = str(info.value)
    assert message.startswith(f"{path}: {field}: ")
    assert expected in message
    assert "\n" not in message

    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"daskdist: error: {message}"


def test_not_yaml_and_no_file_are_invalid_input(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed\n")
    assert main(["validate", str(bad), str(tmp_path / "missing.yaml")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith(f"daskdist: error: {bad}: -: not valid YAML")
    assert err[1] == f"daskdist: error: {tmp_path / 'missing.yaml'}: -: no such file"


def test_validate_reports_each_good_file(capsys):
    assert main(["validate", *map(str, SHIPPED)]) == 0
    out = capsys.readouterr().out
    assert out.count("ok: ") == len(SHIPPED)


def test_overrides_are_applied_before_validation(tmp_path):
    path = _write(tmp_path, _minimal())
    pipeline = load_pipeline(path, {"train.max_epochs": 7, "evaluate.split": "last"})
    assert pipeline.config["train"]["max_epochs"] == 7
    assert pipeline.config["evaluate"]["split"] == "last"
    with pytest.raises(PipelineError, match=r"train\.max_epochs: expected an integer"):
        load_pipeline(path, {"train.max_epochs": "many"})
    assert main(["run", str(path), "--set", "train.max_epochs"]) == 2


# -- running ----------------------------------------------------------------------------------

def test_the_default_pipeline_runs_from_the_command_line(tmp_path, monkeypatch, capsys):
    """``daskdist run`` with the local spec: every output of the run folder is there."""
    monkeypatch.chdir(tmp_path)
    out_dir = tmp_path / "run"
    code = main(["run", str(ROOT / "pipelines/digits-mlp.yaml"), "--workers", "2", "--quiet",
                 "--output", str(out_dir), "--set", "train.max_epochs=10"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert re.search(r"2 workers, watch the run at http://\S+/daskdist\n", captured.out)
    assert f"run folder {out_dir}" in captured.out

    metrics = json.loads((out_dir / "metrics.json").read_text())
    assert metrics["metrics"]["accuracy"] > 0.9
    assert set(metrics["metrics"]) == {"accuracy", "balanced_accuracy", "f1_macro",
                                       "neg_log_loss"}
    assert metrics["metrics"]["neg_log_loss"] > -0.5
    assert metrics["epochs"] == 10 and len(metrics["history"]) == 10
    assert metrics["cluster"] == "local" and metrics["n_workers"] == 2

    for png in ("loss.png", "metrics.png"):
        data = (out_dir / png).read_bytes()
        assert data.startswith(PNG_MAGIC)
        from matplotlib.image import imread

        assert imread(out_dir / png).shape[:2] == (400, 600)

    sidecar = json.loads((out_dir / "checkpoint/checkpoint.json").read_text())
    assert sidecar["meta"]["pipeline"]["train"]["max_epochs"] == 10
    assert sidecar["meta"]["metrics"] == metrics["metrics"]
    assert list((out_dir / "checkpoint").glob("state-*.safetensors"))

    import xarray as xr

    predictions = xr.open_zarr(out_dir / "predictions.zarr").load()
    assert predictions.sizes == {"sample": 360, "class": 10}
    accuracy = float((predictions["target"] == predictions["target_predicted"]).mean())
    assert accuracy == pytest.approx(metrics["metrics"]["accuracy"])

    report = (out_dir / "report.md").read_text()
    for name in ("loss.png", "metrics.png", "predictions.zarr", "checkpoint/", "metrics.json"):
        assert name in report
    assert yaml.safe_load((out_dir / "pipeline.yaml").read_text())["train"]["max_epochs"] == 10

    # Nothing is overwritten unless asked.
    before = (out_dir / "metrics.json").read_text()
    code = main(["run", str(ROOT / "pipelines/digits-mlp.yaml"), "--output", str(out_dir)])
    assert code == 2
    assert "already holds a run; pass --overwrite" in capsys.readouterr().err
    assert (out_dir / "metrics.json").read_text() == before


def test_a_run_resumes_from_its_checkpoint_and_overwrite_keeps_other_files(client, tmp_path):
    path = _write(tmp_path, _minimal(
        train={"estimator": "classifier", "max_epochs": 3, "lr": 0.1, "batch_size": 64,
               "checkpoint_every": 1, "random_state": 0},
        outputs={"dir": str(tmp_path / "run")}))
    first = run_pipeline(load_pipeline(path), progress=False)
    assert len(first.estimator.history) == 3
    resumed = run_pipeline(load_pipeline(path, {"train.max_epochs": 5}), resume=True,
                           progress=False)
    history = resumed.estimator.history
    assert len(history) == 5
    assert [row["epoch"] for row in history] == [1, 2, 3, 4, 5]
    assert history[:3, "train_loss"] == first.estimator.history[:, "train_loss"]
    assert json.loads((tmp_path / "run/metrics.json").read_text())["resumed_from"]

    notes = tmp_path / "run" / "my-notes.txt"
    notes.write_text("keep me")
    run_pipeline(load_pipeline(path), overwrite=True, progress=False)
    assert notes.read_text() == "keep me"
    assert len(json.loads((tmp_path / "run/metrics.json").read_text())["history"]) == 3

    with pytest.raises(PipelineError, match="holds no checkpoint"):
        run_pipeline(load_pipeline(path), output=tmp_path / "empty", resume=True)


def test_a_zarr_store_trains_through_xarray_and_predictions_keep_coordinates(client, tmp_path):
    store = tmp_path / "weather.zarr"
    config = yaml.safe_load((ROOT / "pipelines/weather-zarr.yaml").read_text())
    config["data"]["path"] = str(store)
    config["data"]["generate"]["params"] = {"n_days": 120, "n_stations": 16, "chunk_days": 30}
    config["train"].update(max_epochs=6, batch_size=64, lr=0.01)
    config["outputs"]["dir"] = str(tmp_path / "run")
    result = run_pipeline(load_pipeline(_write(tmp_path, config)), progress=False)
    assert store.is_dir()  # written on first use
    assert result.metrics["r2"] > 0.5

    import xarray as xr

    predictions = xr.open_zarr(result.run_dir / "predictions.zarr").load()
    assert set(predictions.dims) == {"time", "station"}
    assert predictions.sizes == {"time": 24, "station": 16}  # the last 20% of 120 days
    source = xr.open_zarr(store)
    np.testing.assert_array_equal(predictions["time"], source["time"][-24:])
    np.testing.assert_allclose(predictions["t2m_next"], source["t2m_next"][-24:])


def test_a_csv_table_with_text_labels_trains_and_predicts_to_parquet(client, tmp_path):
    from sklearn.datasets import load_iris

    iris = load_iris(as_frame=True)
    frame = iris.frame.rename(columns=lambda c: c.replace(" (cm)", "").replace(" ", "_"))
    frame["species"] = iris.target_names[iris.target]
    frame = frame.drop(columns="target")
    csv = tmp_path / "iris.csv"
    frame.to_csv(csv, index=False)
    config = _minimal(
        data={"source": "csv", "path": str(csv), "target": "species"},
        preprocess=[{"transformer": "StandardScaler"}],
        train={"estimator": "classifier", "max_epochs": 15, "lr": 0.1, "batch_size": 16,
               "optimizer": "SGD", "optimizer__momentum": 0.9, "random_state": 0},
        outputs={"dir": str(tmp_path / "run"), "report": "html"})
    result = run_pipeline(load_pipeline(_write(tmp_path, config)), progress=False)
    assert result.metrics["accuracy"] > 0.8
    predictions = pd.read_parquet(result.run_dir / "predictions.parquet")
    assert set(predictions["species_predicted"]) <= set(iris.target_names)
    assert {"row", "species", "proba_setosa"} <= set(predictions.columns)
    assert (result.run_dir / "report.html").read_text().startswith("<!doctype html>")


def test_wrong_variables_in_a_store_are_invalid_input_before_training(client, tmp_path):
    from daskdist.datasets import write_weather

    store = write_weather(tmp_path / "w.zarr", n_days=20, n_stations=2)
    config = _minimal(data={"source": "zarr", "path": str(store), "features": ["t2m", "rain"],
                            "target": "t2m_next"},
                      train={"estimator": "regressor"},
                      outputs={"dir": str(tmp_path / "run")})
    with pytest.raises(PipelineError, match=r"data\.features\[1\]: no variable 'rain'"):
        run_pipeline(load_pipeline(_write(tmp_path, config)), progress=False)


def test_a_netcdf_source_and_netcdf_predictions(client, tmp_path):
    import xarray as xr

    from daskdist.datasets import make_weather

    path = tmp_path / "weather.nc"
    make_weather(n_days=60, n_stations=8).to_netcdf(path)
    config = _minimal(
        data={"source": "netcdf", "path": str(path), "features": ["t2m", "pressure", "lat"],
              "target": "t2m_next", "sample_dim": ["time", "station"], "chunks": 120},
        model={"module": "MLP", "params": {"hidden": [16], "n_outputs": 1,
                                           "output": "linear"}},
        train={"estimator": "regressor", "max_epochs": 2, "lr": 0.01, "batch_size": 32,
               "optimizer": "Adam"},
        evaluate={"split": "last", "test_size": 0.25, "metrics": ["r2"]},
        outputs={"dir": str(tmp_path / "run"), "predictions": "netcdf"})
    result = run_pipeline(load_pipeline(_write(tmp_path, config)), progress=False)
    assert np.isfinite(result.metrics["r2"])
    with xr.open_dataset(result.run_dir / "predictions.nc") as predictions:
        assert predictions.sizes == {"time": 15, "station": 8}
        assert predictions["t2m_next_predicted"].notnull().all()
