"""Shared fixtures: one real process-based Dask cluster for the whole session."""

from __future__ import annotations

import os

# Keras models train on Keras's torch backend; set before the workers spawn (they inherit it)
os.environ.setdefault("KERAS_BACKEND", "torch")

import numpy as np  # noqa: E402
import pytest
from distributed import Client

from daskdist.clusters.embedded import embedded_cluster
from daskdist.testing import make_classification


@pytest.fixture(scope="session")
def cluster():
    """Two single-threaded worker processes, as daskdist starts them."""
    cluster = embedded_cluster(n_workers=2)
    yield cluster
    cluster.close()


@pytest.fixture(scope="session")
def session_client(cluster):
    client = Client(cluster, set_as_default=False)
    yield client
    client.close()


@pytest.fixture
def client(session_client):
    """The session cluster's client, made the current client for the test."""
    with session_client.as_current():
        yield session_client


@pytest.fixture(scope="session")
def digits():
    """scikit-learn's bundled digits, standardised, as float32."""
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    X = ((X - X.mean(0)) / (X.std(0) + 1e-6)).astype(np.float32)
    return X, y


@pytest.fixture
def tiny_data():
    return make_classification()
