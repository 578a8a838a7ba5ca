"""Synthetic data sets for examples, pipelines and tests (nothing is downloaded).

:func:`make_weather` builds a weather-like regression as an
:class:`xarray.Dataset`: daily observations at stations, with the next
day's temperature as target; :func:`write_weather` stores it as Zarr, chunked
along time, the way gridded and station data usually arrive.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np

__all__ = ["WEATHER_FEATURES", "WEATHER_TARGET", "make_weather", "write_weather", "write_zarr"]

logger = logging.getLogger(__name__)

#: Feature variables of :func:`make_weather`, in the order pipelines use them.
WEATHER_FEATURES = ("t2m", "pressure", "humidity", "wind_u", "wind_v",
                    "elevation", "lat", "doy_sin", "doy_cos")
#: Target variable of :func:`make_weather`.
WEATHER_TARGET = "t2m_next"


def make_weather(n_days: int = 730, n_stations: int = 48, *, seed: int = 0):
    """A weather-like regression: tomorrow's temperature at stations.

    Temperature follows a seasonal cycle whose amplitude grows with latitude,
    a lapse rate with elevation, and a persistent anomaly (AR(1) in time);
    pressure, humidity and wind respond to the anomaly. The target,
    ``t2m_next``, is the next day's temperature: the seasonal-latitude
    interaction and the anomaly's persistence make it non-linear in the
    features, so a neural network does better than a linear model.

    Parameters
    ----------
    n_days : int
        Days of observations (the last day has no next day and is dropped).
    n_stations : int
        Stations, at random latitudes (30–65°N) and elevations (0–2000 m).
    seed : int
        Seed of the generator.

    Returns
    -------
    xarray.Dataset
        Dimensions ``time`` and ``station``; variables
        :data:`WEATHER_FEATURES` and :data:`WEATHER_TARGET` broadcast to
        ``(time, station)``, float32, with units in their attributes.
    """
    import pandas as pd
    import xarray as xr

    if n_days < 2 or n_stations < 1:
        raise ValueError(f"make_weather needs n_days >= 2 and n_stations >= 1, "
                         f"got {n_days} and {n_stations}.")
    rng = np.random.default_rng(seed)
    lat = rng.uniform(30.0, 65.0, n_stations)
    elevation = rng.gamma(1.5, 300.0, n_stations).clip(0.0, 2000.0)
    days = n_days + 1
    doy = (np.arange(days) % 365.25) / 365.25 * 2 * np.pi
    season = -np.cos(doy - 0.35)[:, None]                      # coldest in late January
    amplitude = 4.0 + 0.3 * (lat - 30.0)                      # wider swings further north
    anomaly = np.zeros((days, n_stations))
    shocks = rng.normal(0.0, 2.0, (days, n_stations))
    for t in range(1, days):
        anomaly[t] = 0.8 * anomaly[t - 1] + shocks[t]
    t2m = (25.0 - 0.45 * (lat - 30.0) - 0.0065 * elevation
           + amplitude * season + anomaly + rng.normal(0.0, 0.5, (days, n_stations)))
    pressure = (1013.0 - 0.12 * elevation - 1.5 * anomaly
                + rng.normal(0.0, 4.0, (days, n_stations)))
    humidity = np.clip(70.0 - 1.2 * anomaly * np.sign(season)
                       + rng.normal(0.0, 8.0, (days, n_stations)), 5.0, 100.0)
    wind_u = 3.0 + 0.4 * anomaly + rng.normal(0.0, 2.0, (days, n_stations))
    wind_v = -0.3 * anomaly + rng.normal(0.0, 2.0, (days, n_stations))

    time = pd.date_range("2020-01-01", periods=n_days, freq="D")
    dims = ("time", "station")
    shape = (n_days, n_stations)

    def field(values, units, name):
        values = np.broadcast_to(values, shape).astype(np.float32)
        return xr.Variable(dims, values, {"units": units, "long_name": name})

    return xr.Dataset(
        {
            "t2m": field(t2m[:-1], "degC", "2 m temperature"),
            "pressure": field(pressure[:-1], "hPa", "surface pressure"),
            "humidity": field(humidity[:-1], "%", "relative humidity"),
            "wind_u": field(wind_u[:-1], "m s-1", "eastward wind"),
            "wind_v": field(wind_v[:-1], "m s-1", "northward wind"),
            "elevation": field(elevation[None, :], "m", "station elevation"),
            "lat": field(lat[None, :], "degrees_north", "station latitude"),
            "doy_sin": field(np.sin(doy[:-1])[:, None], "1", "sine of day of year"),
            "doy_cos": field(np.cos(doy[:-1])[:, None], "1", "cosine of day of year"),
            WEATHER_TARGET: field(t2m[1:], "degC", "next day's 2 m temperature"),
        },
        coords={"time": time, "station": np.arange(n_stations)},
        attrs={"title": "daskdist synthetic station weather", "seed": seed},
    )


def write_weather(path, *, n_days: int = 730, n_stations: int = 48, chunk_days: int = 73,
                  seed: int = 0, overwrite: bool = False) -> Path:
    """Write :func:`make_weather` to a Zarr store chunked along ``time``.

    Parameters
    ----------
    path : str or os.PathLike
        The store (a directory).
    n_days, n_stations, seed
        Passed to :func:`make_weather`.
    chunk_days : int
        Days per chunk.
    overwrite : bool
        Replace a store already at ``path``; without it an existing store is
        an error.

    Returns
    -------
    pathlib.Path
        The store.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it.")
    data = make_weather(n_days, n_stations, seed=seed).chunk({"time": chunk_days, "station": -1})
    path.parent.mkdir(parents=True, exist_ok=True)
    write_zarr(data, path, mode="w" if overwrite else "w-")
    logger.info("wrote %d days x %d stations of synthetic weather to %s",
                n_days, n_stations, path)
    return path


def write_zarr(dataset, path, *, mode: str = "w-") -> Path:
    """Write an :class:`xarray.Dataset` to Zarr with consolidated metadata.

    Consolidated metadata lets readers open the store with one request, and
    ``xarray.open_zarr`` reads it by default; zarr's warning that format 3
    does not specify it yet is silenced.

    Parameters
    ----------
    dataset : xarray.Dataset
    path : str or os.PathLike
    mode : {"w-", "w"}
        ``"w-"`` refuses an existing store, ``"w"`` replaces it.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Consolidated metadata is currently not part")
        dataset.to_zarr(path, mode=mode, consolidated=True)
    return Path(path)
