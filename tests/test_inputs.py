"""xarray, Zarr and dataframe inputs: training, labelled predictions and bad input."""

from __future__ import annotations

import dask.array as da
import dask.dataframe as dd
import numpy as np
import pandas as pd
import pytest
import xarray as xr

from daskdist import MLP, DaskNeuralNetClassifier, DaskNeuralNetRegressor
from daskdist.datasets import write_weather, write_zarr
from daskdist.testing import make_classification

#: An address nobody listens on: a fit that tried to reach a cluster would fail with OSError.
NOWHERE = "tcp://127.0.0.1:9"


def _clf(**kwargs):
    params = dict(module__hidden=(16,), max_epochs=6, lr=0.2, batch_size=32, verbose=0,
                  random_state=0, strategy="local_sgd", sync_every=2, train_split=None)
    return DaskNeuralNetClassifier(MLP, **{**params, **kwargs})


def _reg(**kwargs):
    params = dict(module__hidden=(16,), module__output="linear", max_epochs=6, lr=0.01,
                  batch_size=32, verbose=0, random_state=0, strategy="local_sgd",
                  sync_every=2, train_split=None,
                  optimizer=__import__("torch").optim.Adam)
    return DaskNeuralNetRegressor(MLP, **{**params, **kwargs})


@pytest.fixture
def labelled():
    """A classification Dataset along ``time`` (dask-backed, 4 chunks) with attributes."""
    X, y = make_classification(400)
    time = pd.date_range("2021-01-01", periods=len(y), freq="h")
    data = {f"f{i}": ("time", X[:, i]) for i in range(X.shape[1])}
    ds = xr.Dataset({**data, "label": ("time", y)}, coords={"time": time},
                    attrs={"source": "test"}).chunk({"time": 100})
    return ds, X, y


def test_a_dataset_trains_on_named_variables_and_predicts_on_its_coordinates(client, labelled):
    ds, X, y = labelled
    net = _clf().fit(ds, "label")
    assert net.input_features_ == [f"f{i}" for i in range(X.shape[1])]
    pred = net.predict(ds)  # the target variable in ds is left out of the features
    assert isinstance(pred, xr.DataArray) and pred.dims == ("time",)
    assert isinstance(pred.data, da.Array)  # lazy: computed block-wise on the workers
    assert pred.name == "label" and pred.attrs == {"source": "test"}
    np.testing.assert_array_equal(pred["time"], ds["time"])
    np.testing.assert_array_equal(pred.values, net.predict(X))  # the same model
    proba = net.predict_proba(ds)
    assert proba.dims == ("time", "class")
    np.testing.assert_array_equal(proba["class"], net.classes_)
    assert float((pred == ds["label"]).mean()) > 0.7


def test_a_dataarray_with_its_sample_dimension_elsewhere(client):
    X, y = make_classification(300)
    array = xr.DataArray(X.T, dims=("feature", "sample"),
                         coords={"sample": np.arange(300) * 10}, attrs={"units": "1"})
    target = xr.DataArray(y, dims="sample", coords={"sample": np.arange(300) * 10})
    net = _clf(sample_dim="sample").fit(array, target)
    pred = net.predict(array)
    assert pred.dims == ("sample",) and pred.attrs == {"units": "1"}
    np.testing.assert_array_equal(pred["sample"], np.arange(300) * 10)
    np.testing.assert_array_equal(pred.values, net.predict(X))


def test_a_zarr_store_by_path_trains_without_loading_and_predictions_go_back_to_zarr(
        client, tmp_path):
    store = write_weather(tmp_path / "weather.zarr", n_days=200, n_stations=6, chunk_days=25)
    features = ["t2m", "pressure", "humidity", "doy_sin", "doy_cos"]
    net = _reg(features=features, sample_dim="time", max_epochs=4).fit(str(store), "t2m_next")
    assert net.input_features_ == features and net.target_name_ == "t2m_next"
    pred = net.predict(str(store))  # samples along time, one output per station
    assert pred.dims == ("time", "output") and pred.shape == (200, 6)
    assert isinstance(pred.data, da.Array)
    out = tmp_path / "pred.zarr"
    write_zarr(pred.to_dataset(), out)  # written block by block
    written = xr.open_zarr(out)["t2m_next"]
    np.testing.assert_array_equal(written["time"], xr.open_zarr(store)["time"])
    assert np.isfinite(written.values).all()


def test_a_dataframe_with_a_categorical_target_predicts_its_labels(client):
    X, y = make_classification(300)
    names = np.array(["cloud", "rain", "sun"])[y % 3]
    frame = pd.DataFrame(X, columns=[f"x{i}" for i in range(X.shape[1])],
                         index=pd.RangeIndex(1000, 1300, name="id"))
    frame["weather"] = pd.Categorical(names, categories=["sun", "rain", "cloud", "snow"])
    net = _clf().fit(frame, "weather")
    assert list(net.classes_) == ["cloud", "rain", "snow", "sun"]  # every category is a class
    pred = net.predict(frame)
    assert isinstance(pred, pd.Series) and pred.name == "weather"
    assert pred.index.equals(frame.index)
    assert set(pred) <= {"sun", "rain", "cloud"}
    proba = net.predict_proba(frame)
    assert list(proba.columns) == ["cloud", "rain", "snow", "sun"]

    lazy = dd.from_pandas(frame, npartitions=3)
    net = _clf().fit(lazy, "weather")
    pred = net.predict(lazy)
    assert isinstance(pred, dd.Series)
    computed = pred.compute()
    assert computed.index.equals(frame.index) and set(computed) <= {"sun", "rain", "cloud"}


# -- bad input ---------------------------------------------------------------------------------

@pytest.mark.parametrize("case, match", [
    ("missing_sample_dim", r"sample_dim='step' is not a dimension of X; its dimensions are "
                           r"\('time',\)"),
    ("missing_target", r"target variable 'lable' is not in X"),
    ("missing_feature", r"X has no variable 'f99'"),
    ("text_feature", r"variable 'station' holds .* values; features must be numbers"),
    ("misaligned", r"X and y are not aligned along 'time'"),
    ("length", r"X has 400 samples along 'time' but y has 399"),
    ("frame_column", r"target column 'kind' is not in X"),
])
def test_bad_labelled_input_is_refused_before_anything_is_submitted(labelled, case, match):
    ds, _, y = labelled
    net = _clf(scheduler_address=NOWHERE)
    args = {
        "missing_sample_dim": lambda: (_clf(scheduler_address=NOWHERE, sample_dim="step"),
                                       ds, "label"),
        "missing_target": lambda: (net, ds, "lable"),
        "missing_feature": lambda: (_clf(scheduler_address=NOWHERE, features=["f0", "f99"]),
                                    ds, "label"),
        "text_feature": lambda: (net, ds.assign(station=("time", np.array(["a"] * 400))),
                                 "label"),
        "misaligned": lambda: (net, ds.drop_vars("label"),
                               ds["label"].assign_coords(time=ds["time"] + np.timedelta64(1, "h"))),
        "length": lambda: (net, ds.drop_vars("label"), ds["label"][:-1]),
        "frame_column": lambda: (net, ds.to_dataframe(), "kind"),
    }[case]
    estimator, X, target = args()
    with pytest.raises(ValueError, match=match):
        estimator.fit(X, target)


def test_non_finite_features_are_reported_with_their_chunk_before_the_first_round(client):
    X, y = make_classification(400)
    X[250, 3] = np.nan
    net = _clf()
    with pytest.raises(ValueError, match=r"X contains NaN or infinity in chunk 2 of 4 along "
                                         r"the samples \(samples 200 to 299\)"):
        net.fit(da.from_array(X, chunks=(100, -1)), da.from_array(y, chunks=100))
    assert not hasattr(net, "rounds_") or net.rounds_.empty
