"""Labelled inputs: xarray, Zarr and dataframes in, arrays to train on, labels back out.

The estimators train on arrays whose first axis is the samples. This module
turns the containers people keep their data in into such arrays — lazily, so
nothing is loaded on the client — and remembers what :meth:`predict` needs to
label its output the way the input was labelled:

=====================================  =================================================
input                                  samples, features
=====================================  =================================================
``xarray.DataArray``                   along ``sample_dim`` (default the first
                                       dimension); the other dimensions are kept, in
                                       their order: ``(n, *rest)``
``xarray.Dataset``                     the ``features`` variables (default every data
                                       variable but the target) stacked along a new
                                       axis right after the samples, channels first as
                                       torch's convolutions expect: ``(n, n_vars,
                                       *rest)``; ``y`` names the target variable
a Zarr store (path or opened store)    opened with ``xarray.open_zarr``, then as a
                                       Dataset (``.nc`` paths with
                                       ``xarray.open_dataset``)
``pandas``/``dask`` ``DataFrame``      the ``features`` columns (default every column
                                       but the target); ``y`` names the target column
                                       or is a Series with the same index
=====================================  =================================================

Modules that want flat inputs flatten them (``daskdist.models.MLP`` does).
Predictions come back as a ``DataArray`` with the sample coordinates and the
input's attributes, or as a Series/DataFrame with the input's index; for dask
inputs they stay lazy, so ``predict(ds).to_zarr(path)`` writes them block by
block. A categorical target keeps its categories as the classes.

Checks made here read metadata only: a missing sample dimension, variable or
column, misaligned sample coordinates or indexes, and non-numeric features
are :class:`ValueError` before anything is submitted to the cluster.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import dask.array as da
import numpy as np

__all__ = ["Labels", "to_arrays"]


@dataclass(frozen=True)
class Labels:
    """How to label predictions like the input they were made from.

    Attributes
    ----------
    kind : {"array", "xarray", "pandas", "dask-dataframe"}
    sample_dim : str or None
        The xarray sample dimension.
    coords : dict
        xarray coordinates along the sample dimension.
    attrs : dict
        The xarray input's attributes.
    index : object
        The pandas or dask dataframe's index.
    name : str or None
        The target's name, used for the predictions.
    classes : numpy.ndarray or None
        Categories of a categorical target, in order.
    features : list of str or None
        The feature variables or columns used (Datasets and dataframes).
    """

    kind: str = "array"
    sample_dim: str | None = None
    coords: dict = field(default_factory=dict)
    attrs: dict = field(default_factory=dict)
    index: object = None
    name: str | None = None
    classes: np.ndarray | None = None
    features: list | None = None

    def wrap(self, values, *, columns=None, column_dim: str = "output"):
        """Label ``values`` (one row per sample) like the input.

        Parameters
        ----------
        values : numpy.ndarray or dask.array.Array
            Predictions, samples along the first axis.
        columns : array-like, optional
            Labels of the second axis (classes for probabilities).
        column_dim : str
            Name of the second axis for xarray output.
        """
        if self.kind == "xarray":
            import xarray as xr

            dims = (self.sample_dim,) + ((column_dim,) if values.ndim > 1 else ())
            coords = dict(self.coords)
            if values.ndim > 1 and columns is not None:
                coords[column_dim] = np.asarray(columns)
            return xr.DataArray(values, dims=dims, coords=coords, attrs=dict(self.attrs),
                                name=self.name or "prediction")
        if self.kind == "pandas":
            import pandas as pd

            values = np.asarray(values)
            if values.ndim == 1:
                return pd.Series(values, index=self.index, name=self.name)
            return pd.DataFrame(values, index=self.index,
                                columns=None if columns is None else list(columns))
        if self.kind == "dask-dataframe":
            import dask.dataframe as dd

            if values.ndim == 1:
                return dd.from_dask_array(values, columns=self.name, index=self.index)
            names = [str(c) for c in columns] if columns is not None else None
            return dd.from_dask_array(values, columns=names, index=self.index)
        return values


def to_arrays(X, y=None, *, sample_dim: str | None = None, features=None):
    """Turn labelled inputs into arrays to train on; return ``(X, y, labels)``.

    Parameters
    ----------
    X : array-like, xarray object, Zarr store, path, or dataframe
        See the module docstring.
    y : array-like, xarray.DataArray, Series, str or None
        Targets, or the name of the target variable or column of ``X``.
    sample_dim : str, optional
        The xarray dimension that indexes samples; default the first one.
    features : list of str, optional
        Variables (Dataset) or columns (DataFrame) to use as features.

    Returns
    -------
    X, y : numpy.ndarray or dask.array.Array
        Samples along the first axis (numpy and dask arrays pass through).
    labels : Labels

    Raises
    ------
    ValueError
        For a missing dimension, variable or column, misaligned samples, or
        non-numeric features (from metadata only).
    """
    if isinstance(X, (str, os.PathLike)) or _is_zarr_store(X):
        X = _open_store(X)
    module = type(X).__module__
    if module.startswith("xarray"):
        return _from_xarray(X, y, sample_dim, features)
    if _is_dask_dataframe(X) or module.startswith("pandas"):
        return _from_frame(X, y, features)
    # sample_dim and features name parts of labelled inputs; arrays are already samples x
    # features (a model fitted on a Dataset predicts on its arrays too).
    if isinstance(y, str):
        raise ValueError(f"y={y!r} names a target variable, but X is a {type(X).__name__}; "
                         "pass the targets as an array.")
    return X, _plain_targets(y), Labels()


# -- xarray ---------------------------------------------------------------------------------

def _open_store(path):
    import xarray as xr

    if _is_zarr_store(path):
        return xr.open_zarr(path)
    text = os.fspath(path)
    if not os.path.exists(text):
        raise ValueError(f"X is the path {text!r}, which does not exist.")
    if text.rstrip("/").endswith((".nc", ".nc4", ".netcdf")):
        return xr.open_dataset(text, chunks={})
    return xr.open_zarr(text)


def _is_zarr_store(obj) -> bool:
    return type(obj).__module__.startswith("zarr")


def _from_xarray(X, y, sample_dim, features):
    import xarray as xr

    if isinstance(X, xr.Dataset):
        target, y = _target_variable(X, y)
        names = _feature_names(list(X.data_vars), features, target, "variable")
        sample_dim = _sample_dim(X[names[0]], sample_dim)
        for name in names:
            _check_numeric(X[name].dtype, f"variable {name!r}")
            if sample_dim not in X[name].dims:
                raise ValueError(f"Feature variable {name!r} has no {sample_dim!r} dimension "
                                 f"(its dimensions are {X[name].dims}).")
        stacked = X[names].to_dataarray("variable")
        rest = [d for d in stacked.dims if d not in (sample_dim, "variable")]
        array = stacked.transpose(sample_dim, "variable", *rest)
        source = X
    else:
        if features is not None:
            raise ValueError("features selects variables of a Dataset; X is a DataArray.")
        sample_dim = _sample_dim(X, sample_dim)
        _check_numeric(X.dtype, "X")
        array = X.transpose(sample_dim, ...)
        source = X
        target = None
    labels = Labels(
        kind="xarray", sample_dim=sample_dim,
        coords={name: coord.variable for name, coord in source.coords.items()
                if coord.dims == (sample_dim,)},
        attrs=dict(source.attrs), name=target if target is not None else getattr(y, "name", None),
        features=[str(n) for n in names] if isinstance(X, xr.Dataset) else None)
    y_values, classes = _xarray_targets(y, array, sample_dim)
    return array.data, y_values, _with_classes(labels, classes)


def _target_variable(X, y):
    if isinstance(y, str):
        if y not in X.data_vars:
            raise ValueError(f"The target variable {y!r} is not in X; its variables are "
                             f"{sorted(map(str, X.data_vars))}.")
        return y, X[y]
    return None, y


def _sample_dim(array, sample_dim):
    if not array.dims:
        raise ValueError("X has no dimensions; it needs one that indexes samples.")
    if sample_dim is None:
        return array.dims[0]
    if sample_dim not in array.dims:
        raise ValueError(f"sample_dim={sample_dim!r} is not a dimension of X; its "
                         f"dimensions are {tuple(map(str, array.dims))}.")
    return sample_dim


def _xarray_targets(y, array, sample_dim):
    import xarray as xr

    if y is None:
        return None, None
    if isinstance(y, xr.DataArray):
        if sample_dim not in y.dims:
            raise ValueError(f"y has no {sample_dim!r} dimension (its dimensions are "
                             f"{tuple(map(str, y.dims))}).")
        if y.sizes[sample_dim] != array.sizes[sample_dim]:
            raise ValueError(f"X has {array.sizes[sample_dim]} samples along {sample_dim!r} "
                             f"but y has {y.sizes[sample_dim]}.")
        x_index, y_index = array.indexes.get(sample_dim), y.indexes.get(sample_dim)
        if x_index is not None and y_index is not None and not x_index.equals(y_index):
            raise ValueError(f"X and y are not aligned along {sample_dim!r}: their "
                             f"{sample_dim} coordinates differ (align them with "
                             "xarray.align first).")
        y = y.transpose(sample_dim, ...)
        return y.data, None
    return _plain_targets(y), None


# -- dataframes ------------------------------------------------------------------------------

def _is_dask_dataframe(obj) -> bool:
    return type(obj).__module__.startswith("dask") and hasattr(obj, "columns") and hasattr(
        obj, "divisions")


def _from_frame(X, y, features):
    lazy = _is_dask_dataframe(X)
    if not hasattr(X, "columns"):  # a Series of features
        X = X.to_frame()
    name = None
    if isinstance(y, str):
        if y not in X.columns:
            raise ValueError(f"The target column {y!r} is not in X; its columns are "
                             f"{list(map(str, X.columns))}.")
        name, y = y, X[y]
    columns = _feature_names(list(X.columns), features, name, "column")
    for column in columns:
        _check_numeric(X[column].dtype, f"column {column!r}")
    frame = X[columns]
    # one dtype for all columns (int and bool columns beside floats: float64), so
    # that the values are numbers, not objects; feature_dtype converts them on the workers
    common = np.result_type(*(np.dtype(getattr(frame[c].dtype, "numpy_dtype", frame[c].dtype))
                              for c in columns))
    if any(frame[c].dtype != common for c in columns):
        frame = frame.astype(common)
    y_series = y if y is not None and hasattr(y, "index") and hasattr(y, "dtype") else None
    if y_series is not None and not lazy and not y_series.index.equals(frame.index):
        raise ValueError("X and y have different indexes; align them first.")
    classes = _categories(y_series) if y_series is not None else None
    if lazy:
        X_values = frame.to_dask_array(lengths=True)
        if y_series is not None:
            y_values = _series_values(y_series, classes).to_dask_array(lengths=X_values.chunks[0])
        else:
            y_values = _plain_targets(y)
        labels = Labels(kind="dask-dataframe", index=X.index, name=name or _series_name(y),
                        features=columns)
    else:
        X_values = frame.to_numpy()
        y_values = (np.asarray(_series_values(y_series, classes)) if y_series is not None
                    else _plain_targets(y))
        labels = Labels(kind="pandas", index=X.index, name=name or _series_name(y),
                        features=columns)
    return X_values, y_values, _with_classes(labels, classes)


def _categories(series):
    dtype = series.dtype
    if getattr(dtype, "name", None) != "category":
        return None
    categories = getattr(dtype, "categories", None)
    if categories is None:  # a dask series with unknown categories
        raise ValueError("The target's categories are unknown; call "
                         "y.cat.as_known() (or categorize the column) first.")
    return np.asarray(categories)


def _series_values(series, classes):
    """Category labels as plain values (the estimator encodes them itself)."""
    if classes is None:
        return series
    return series.astype(classes.dtype if classes.dtype != object else object)


def _series_name(y):
    name = getattr(y, "name", None)
    return None if name is None else str(name)


# -- shared ----------------------------------------------------------------------------------

def _feature_names(available: list, features, target, noun: str) -> list:
    """The requested features (default: all but the target), each checked to exist."""
    names = list(features) if features is not None else [v for v in available if v != target]
    missing = [v for v in names if v not in available]
    if missing:
        raise ValueError(f"X has no {noun} {missing[0]!r}; its {noun}s are "
                         f"{sorted(map(str, available))}.")
    if not names:
        raise ValueError(f"X has no feature {noun}s left besides the target.")
    return names


def _check_numeric(dtype, what: str) -> None:
    dtype = np.dtype(dtype) if not hasattr(dtype, "kind") else dtype
    if getattr(dtype, "kind", "O") not in "biuf":
        raise ValueError(f"{what} holds {dtype} values; features must be numbers "
                         "(encode categories or dates as numbers first).")


def _plain_targets(y):
    if y is None or isinstance(y, da.Array):
        return y
    if hasattr(y, "to_dask_array"):
        return y.to_dask_array(lengths=True)
    return y


def _with_classes(labels: Labels, classes) -> Labels:
    if classes is None:
        return labels
    from dataclasses import replace

    return replace(labels, classes=classes)
