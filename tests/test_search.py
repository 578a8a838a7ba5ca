"""dask-ml's ``HyperbandSearchCV`` over daskdist estimators, through ``daskdist._compat``.

Each trial's ``partial_fit`` is a task on a worker, and is itself a
distributed fit on the same cluster (:func:`daskdist.clusters.embedded.cluster_client`
finds it from inside the task).
"""

import dask
import dask.array as da
import numpy as np
import pytest
from sklearn.model_selection import GridSearchCV

from daskdist import DaskNeuralNetClassifier
from daskdist._compat import incremental_search
from daskdist.testing import TinyNet, make_classification

GRID = {"lr": [1e-4, 0.3], "strategy": ["local_sgd", "sync"], "sync_every": [2, 8]}


def _net(**kwargs):
    return DaskNeuralNetClassifier(TinyNet, batch_size=32, verbose=0, train_split=None,
                                   random_state=0, classes=[0, 1, 2], **kwargs)


def test_dask_ml_search_module_is_patched_on_import():
    import dask_ml.model_selection._incremental as module

    assert incremental_search.needs_patch()  # the installed dask-ml is one that needs it
    assert incremental_search.patched(module)
    assert module.dask.persist is incremental_search.persist
    assert module.dask.delayed is dask.delayed  # everything else is dask's own


def test_persist_goes_through_the_client_like_dask_persist(client):
    x = da.arange(10, chunks=5)
    lazy = dask.delayed(sum)([1, 2, 3])
    out = incremental_search.persist(x, {"a": lazy, "b": 7}, [x + 1], "plain")
    assert isinstance(out, tuple) and len(out) == 4
    np.testing.assert_array_equal(out[0].compute(), np.arange(10))
    assert out[1]["a"].compute() == 6 and out[1]["b"] == 7
    np.testing.assert_array_equal(out[2][0].compute(), np.arange(1, 11))
    assert out[3] == "plain"
    assert incremental_search.persist(1, "two") == (1, "two")  # nothing to persist


def test_hyperband_finds_what_grid_search_finds(client):
    from dask_ml.model_selection import HyperbandSearchCV

    X, y = make_classification(480)
    search = HyperbandSearchCV(_net(max_epochs=1), GRID, max_iter=3, random_state=0,
                               test_size=0.25)
    search.fit(da.from_array(X, chunks=120), da.from_array(y, chunks=120))
    # Hyperband samples its candidates from the grid: both strategies, both rates, each
    # trial a distributed fit of its own
    tried = search.cv_results_["params"]
    assert len(tried) >= 4
    assert {p["strategy"] for p in tried} == {"local_sgd", "sync"}
    assert {p["lr"] for p in tried} == {1e-4, 0.3}
    assert len(search.best_estimator_.rounds_["replicas"].iloc[-1]) == 2
    grid = GridSearchCV(_net(max_epochs=3), GRID, cv=[(np.arange(360), np.arange(360, 480))])
    grid.fit(X, y)
    # the learning rate decides (1e-4 barely moves in 3 epochs); strategy and sync_every
    # change the score by less than the noise between the two searches' splits
    assert search.best_params_["lr"] == grid.best_params_["lr"] == 0.3
    assert search.best_score_ > 0.6 and grid.best_score_ > 0.6
    assert max(s for s, p in zip(search.cv_results_["test_score"], search.cv_results_["params"])
               if p["lr"] == 1e-4) < search.best_score_ - 0.1
    _wait_idle(client)


def _wait_idle(client, timeout=60.0):
    """Wait for the trials Hyperband cancelled while they ran (a running task is not stopped)."""
    import time

    deadline = time.monotonic() + timeout
    while any(client.processing().values()) and time.monotonic() < deadline:
        time.sleep(0.2)


@pytest.mark.parametrize("module_loaded", [False, True])
def test_install_patches_now_or_on_import(module_loaded, monkeypatch):
    import sys

    target = incremental_search.TARGET
    monkeypatch.delitem(sys.modules, target)
    monkeypatch.setattr(sys, "meta_path", [f for f in sys.meta_path
                                           if not isinstance(f, incremental_search._PatchOnImport)])
    import importlib

    if module_loaded:  # imported before daskdist: patched at once
        module = importlib.import_module(target)
        assert not incremental_search.patched(module)
        incremental_search.install()
    else:  # imported after: patched as it loads
        incremental_search.install()
        module = importlib.import_module(target)
    assert incremental_search.patched(module)
