"""Turning a pipeline's ``data`` section into training arrays, and splitting them.

Bundled and synthetic data sets and ``.npy`` files arrive as numpy arrays (the
estimator scatters their shards to the workers). Zarr and NetCDF stores are
opened lazily through xarray and Parquet/CSV tables through dask.dataframe, so
their samples stay dask arrays: nothing is loaded on the client before
training, and each shard is read on the worker that trains it.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, replace
from pathlib import Path

import dask.array as da
import numpy as np

from .load import Pipeline, PipelineError

__all__ = ["PipelineData", "load_data", "split_data"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PipelineData:
    """Samples of a pipeline, as the estimator takes them.

    Attributes
    ----------
    X, y : numpy.ndarray or dask.array.Array
        Features ``(n_samples, n_features)`` float32; targets ``(n_samples,)``
        (classifiers) or ``(n_samples, n_targets)`` float32 (regressors).
    kind : {"array", "grid", "table"}
        In-memory arrays; a gridded (xarray) source; a table.
    feature_names : list of str
    target_name : str
    rows : numpy.ndarray or None
        Positions of these samples in the source (set after a split).
    sample_index : pandas.Index or None
        For grids, the source's coordinates of every sample (a MultiIndex
        when several dimensions were stacked).
    description : str
        One line for logs and the report.
    """

    X: object
    y: object
    kind: str
    feature_names: list
    target_name: str
    rows: np.ndarray | None = None
    sample_index: object = None
    description: str = ""

    @property
    def n_samples(self) -> int:
        """Number of samples."""
        return int(self.X.shape[0])


def load_data(pipeline: Pipeline) -> PipelineData:
    """Open the pipeline's data source (lazily for stores and tables).

    Raises
    ------
    PipelineError
        When the source lacks the named variables or columns, or its
        samples and targets do not line up.
    """
    spec = pipeline.config["data"]
    source = spec["source"]
    loader = {"sklearn": _load_sklearn, "synthetic": _load_synthetic, "npy": _load_npy,
              "zarr": _load_store, "netcdf": _load_store, "parquet": _load_table,
              "csv": _load_table}[source]
    data = loader(spec, pipeline)
    if data.y.shape[0] != data.X.shape[0]:
        raise PipelineError(pipeline.path, "data", f"{data.X.shape[0]} samples of features "
                            f"but {data.y.shape[0]} targets")
    y = data.y
    if pipeline.is_classifier:
        y = y.reshape(-1) if y.ndim > 1 and y.shape[1] == 1 else y
    else:
        y = (y.reshape(-1, 1) if y.ndim == 1 else y).astype(np.float32)
    chunks = spec.get("chunks")
    X = data.X.astype(np.float32)
    if isinstance(X, da.Array):  # transformers and shards want whole rows in a chunk
        X = X.rechunk({0: chunks or X.chunks[0], 1: -1})
        y = y.rechunk({0: X.chunks[0], **({1: -1} if y.ndim > 1 else {})})
    return replace(data, X=X, y=y)


def split_data(data: PipelineData, evaluate: dict, *, classifier: bool
               ) -> tuple[PipelineData, PipelineData]:
    """Hold out ``evaluate.test_size`` of the samples.

    ``split: random`` draws rows with ``evaluate.random_state`` (stratified by
    class for in-memory classifier targets); ``split: last`` holds out the
    last rows, which for time-major sources is the latest period.

    Returns
    -------
    train, test : PipelineData
        With ``rows`` set to the positions of their samples in ``data``.
    """
    n = data.n_samples
    n_test = max(1, math.ceil(n * evaluate["test_size"]))
    if n_test >= n:
        raise ValueError(f"evaluate.test_size={evaluate['test_size']} leaves no training "
                         f"samples out of {n}.")
    if evaluate["split"] == "last":
        train_rows, test_rows = np.arange(n - n_test), np.arange(n - n_test, n)
        return (_take(data, train_rows, slice(0, n - n_test)),
                _take(data, test_rows, slice(n - n_test, n)))
    from sklearn.model_selection import train_test_split

    stratify = data.y if classifier and isinstance(data.y, np.ndarray) else None
    train_rows, test_rows = train_test_split(
        np.arange(n), test_size=n_test, random_state=evaluate["random_state"],
        stratify=stratify)
    train_rows.sort()
    test_rows.sort()
    return _take(data, train_rows, train_rows), _take(data, test_rows, test_rows)


def _take(data: PipelineData, rows: np.ndarray, index) -> PipelineData:
    return replace(data, X=data.X[index], y=data.y[index], rows=rows)


# -- sources --------------------------------------------------------------------

def _load_sklearn(spec: dict, pipeline: Pipeline) -> PipelineData:
    import sklearn.datasets

    loader = getattr(sklearn.datasets, f"load_{spec['name']}")
    bunch = loader(**spec["params"])
    names = [str(n) for n in getattr(bunch, "feature_names", [])] or \
        [f"x{i}" for i in range(bunch.data.shape[1])]
    return PipelineData(X=np.asarray(bunch.data), y=np.asarray(bunch.target), kind="array",
                        feature_names=names, target_name="target",
                        description=f"scikit-learn's bundled {spec['name']} data set "
                                    f"({bunch.data.shape[0]} samples, "
                                    f"{bunch.data.shape[1]} features)")


def _load_synthetic(spec: dict, pipeline: Pipeline) -> PipelineData:
    name, params = spec["name"], dict(spec["params"])
    if name == "weather":
        from ..datasets import WEATHER_FEATURES, WEATHER_TARGET, make_weather

        dataset = make_weather(**params)
        spec = {**spec, "features": spec.get("features", list(WEATHER_FEATURES)),
                "target": spec.get("target", WEATHER_TARGET)}
        return _from_xarray(dataset.chunk(), spec, pipeline, "synthetic weather")
    import sklearn.datasets

    params.setdefault("random_state", 0)
    try:
        X, y = getattr(sklearn.datasets, f"make_{name}")(**params)
    except TypeError as error:
        raise PipelineError(pipeline.path, "data.params", str(error)) from None
    return PipelineData(X=X, y=y, kind="array",
                        feature_names=[f"x{i}" for i in range(X.shape[1])], target_name="y",
                        description=f"synthetic {name} ({X.shape[0]} samples, "
                                    f"{X.shape[1]} features)")


def _load_npy(spec: dict, pipeline: Pipeline) -> PipelineData:
    try:
        X, y = np.load(spec["path"]), np.load(spec["target_path"])
    except ValueError as error:  # pickled object arrays are refused
        raise PipelineError(pipeline.path, "data.path", f"cannot read the .npy file without "
                            f"unpickling: {error}") from None
    if X.ndim < 2:
        raise PipelineError(pipeline.path, "data.path", f"expected features of shape "
                            f"(n_samples, ...), got shape {X.shape}")
    return PipelineData(X=X.reshape(X.shape[0], -1), y=y, kind="array",
                        feature_names=[f"x{i}" for i in range(int(np.prod(X.shape[1:])))],
                        target_name=Path(spec["target_path"]).stem,
                        description=f"{spec['path']} ({X.shape[0]} samples)")


def _load_store(spec: dict, pipeline: Pipeline) -> PipelineData:
    import xarray as xr

    path = os.path.expanduser(spec["path"])
    if not os.path.exists(path) and spec.get("generate"):
        _generate(spec, path)
    try:
        if spec["source"] == "zarr":
            dataset = xr.open_zarr(path)
        else:
            dataset = xr.open_dataset(path, chunks={})
    except (OSError, ValueError, KeyError) as error:
        raise PipelineError(pipeline.path, "data.path",
                            f"cannot open {spec['path']!r} as {spec['source']}: {error}") from None
    return _from_xarray(dataset, spec, pipeline, f"{spec['source']} store {spec['path']}")


def _generate(spec: dict, path: str) -> None:
    from ..datasets import make_weather, write_weather

    generate = spec["generate"]
    logger.warning("%s does not exist: writing synthetic %s data there", path, generate["name"])
    if spec["source"] == "zarr":
        write_weather(path, **generate.get("params", {}))
    else:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        make_weather(**generate.get("params", {})).to_netcdf(path)


def _from_xarray(dataset, spec: dict, pipeline: Pipeline, what: str) -> PipelineData:
    names = list(dataset.data_vars)
    for i, variable in enumerate(spec["features"]):
        if variable not in dataset:
            raise PipelineError(pipeline.path, f"data.features[{i}]",
                                f"no variable {variable!r} in the data; it has: {', '.join(names)}")
    if spec["target"] not in dataset:
        raise PipelineError(pipeline.path, "data.target", f"no variable {spec['target']!r} "
                            f"in the data; it has: {', '.join(names)}")
    target = dataset[spec["target"]]
    sample_dims = spec.get("sample_dim") or target.dims[0]
    sample_dims = [sample_dims] if isinstance(sample_dims, str) else list(sample_dims)
    for dim in sample_dims:
        if dim not in target.dims:
            raise PipelineError(pipeline.path, "data.sample_dim", f"{dim!r} is not a dimension "
                                f"of {spec['target']!r} (it has {', '.join(target.dims)})")
    features = dataset[spec["features"]].to_dataarray("variable")
    features = _as_samples(features, sample_dims, "variable")
    y = _as_samples(target, sample_dims, None)
    X = features.data if isinstance(features.data, da.Array) else da.from_array(features.data)
    y_data = y.data if isinstance(y.data, da.Array) else da.from_array(y.data)
    return PipelineData(X=X, y=y_data, kind="grid",
                        feature_names=[str(v) for v in features["feature"].values],
                        target_name=spec["target"],
                        sample_index=features.indexes["sample"],
                        description=f"{what}: {X.shape[0]} samples over "
                                    f"({', '.join(sample_dims)}), "
                                    f"{X.shape[1]} features")


def _as_samples(array, sample_dims: list, feature_dim: str | None):
    """Stack ``sample_dims`` into ``sample`` and every other dimension into ``feature``."""
    stacked = array.stack(sample=sample_dims) if len(sample_dims) > 1 else \
        array.rename({sample_dims[0]: "sample"})
    rest = [d for d in stacked.dims if d != "sample"]
    if feature_dim is None and not rest:
        return stacked
    stacked = stacked.stack(feature=rest) if len(rest) > 1 else stacked.rename({rest[0]: "feature"})
    if "feature" in stacked.indexes and len(rest) > 1:
        labels = ["/".join(map(str, v)) for v in stacked.indexes["feature"]]
        stacked = stacked.drop_vars(["feature", *rest]).assign_coords(feature=labels)
    return stacked.transpose("sample", "feature")


def _load_table(spec: dict, pipeline: Pipeline) -> PipelineData:
    import dask.dataframe as dd

    reader = dd.read_parquet if spec["source"] == "parquet" else dd.read_csv
    try:
        frame = reader(os.path.expanduser(spec["path"]))
    except (OSError, ValueError) as error:
        raise PipelineError(pipeline.path, "data.path",
                            f"cannot read {spec['path']!r} as {spec['source']}: {error}") from None
    columns = [str(c) for c in frame.columns]
    target = spec["target"]
    if target not in columns:
        raise PipelineError(pipeline.path, "data.target", f"no column {target!r}; the table "
                            f"has: {', '.join(columns)}")
    features = spec.get("features") or [c for c in columns if c != target]
    for i, column in enumerate(features):
        if column not in columns:
            raise PipelineError(pipeline.path, f"data.features[{i}]", f"no column {column!r}; "
                                f"the table has: {', '.join(columns)}")
    X = frame[features].to_dask_array(lengths=True)
    y_column = frame[target]
    from pandas.api.types import is_numeric_dtype

    if pipeline.is_classifier and not is_numeric_dtype(y_column.dtype):
        y_column = y_column.astype(str).astype(object)
    y = y_column.to_dask_array(lengths=X.chunks[0])
    return PipelineData(X=X, y=y, kind="table", feature_names=features, target_name=target,
                        description=f"{spec['source']} table {spec['path']}: "
                                    f"{X.shape[0]} rows, {len(features)} feature columns")
