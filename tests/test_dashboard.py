"""The dashboard: named tasks, spans, the /daskdist page (in real Chromium), the progress bar."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import dask.array as da
import pytest
from distributed import Client, LocalCluster

from daskdist import DaskNeuralNetClassifier
from daskdist._compat import (
    add_http_routes,
    http_routes_added,
    reschedule_stranded,
    task_state,
    who_has,
    workers,
)
from daskdist.dashboard.page import routes
from daskdist.testing import TinyNet, make_classification

#: Where tests leave files worth looking at (git-ignored).
OUTPUTS = Path(__file__).parent / "outputs"


def _get_json(url):
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.load(response)


def _net(client, **kwargs):
    params = dict(max_epochs=3, lr=0.2, batch_size=64, strategy="local_sgd", sync_every=2,
                  verbose=0, random_state=0, scheduler_address=client.scheduler.address)
    return DaskNeuralNetClassifier(TinyNet, **{**params, **kwargs})


def _keys_during(client, fit):
    """Run ``fit`` in a thread; return every task key the scheduler held meanwhile."""
    seen, done = set(), threading.Event()
    errors = []

    def run():
        try:
            with client.as_current():  # (the current client does not follow threads)
                fit()
        except BaseException as error:  # noqa: BLE001 - reported below
            errors.append(error)
        finally:
            done.set()

    thread = threading.Thread(target=run)
    thread.start()
    while not done.is_set():
        seen.update(client.run_on_scheduler(
            lambda dask_scheduler: [str(k[0] if isinstance(k, tuple) else k)
                                    for k in dask_scheduler.tasks]))
        time.sleep(0.05)
    thread.join()
    if errors:
        raise errors[0]
    return seen


def test_task_keys_and_spans_read_as_a_training_run(client):
    X, y = make_classification(2000)
    net = _net(client, train_split=None)
    keys = _keys_during(client, lambda: net.fit(da.from_array(X, chunks=500), y))
    prefixes = {re.match(r"(daskdist-[a-z]+)", k).group(1) for k in keys
                if k.startswith("daskdist-")}
    assert {"daskdist-take", "daskdist-shard", "daskdist-round",
            "daskdist-average"} <= prefixes
    # (a prediction on a warm cluster can end between two looks at the scheduler: read
    # the names from the graph that runs it)
    prediction = net.predict(da.from_array(X, chunks=500))
    assert any("daskdist-predict" in str(k) for k in dict(prediction.__dask_graph__()))
    assert prediction.compute().shape == (len(X),)

    def spans(dask_scheduler):
        out = {}
        for s in dask_scheduler.extensions["spans"].spans.values():
            out.setdefault(s.name, set()).update(
                tg.name for tg in s.groups)  # the task groups whose tasks ran in it
        return {" / ".join(name): sorted(groups) for name, groups in out.items()}

    by_span = client.run_on_scheduler(spans)
    run = [name for name in by_span if name.startswith("daskdist-fit / ")
           and name.endswith(" / data")]
    assert run, sorted(by_span)
    fit = run[-1][:-len(" / data")]
    assert any("daskdist-shard" in g for g in by_span[f"{fit} / data"])
    for epoch in (1, 2, 3):
        groups = by_span[f"{fit} / epoch-{epoch}"]
        assert any(g.startswith("daskdist-round") for g in groups), groups
        assert any(g.startswith("daskdist-average") for g in groups), groups


def test_the_page_is_added_to_a_cluster_daskdist_did_not_start():
    """A user's cluster: the fit registers the monitor, which adds /daskdist; runs add up."""
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False,
                      dashboard_address="127.0.0.1:0") as cluster, Client(cluster) as user:
        scheduler = cluster.scheduler
        assert not http_routes_added(scheduler, routes)
        X, y = make_classification(600)
        first = _net(user).fit(X, y)
        assert http_routes_added(scheduler, routes)
        second = _net(user, strategy="sync").fit(X, y)
        link = second.dashboard_link_
        assert link == first.dashboard_link_ and link.endswith("/daskdist")
        runs = _get_json(link + "/runs.json")["runs"]
        assert [r["strategy"] for r in runs] == ["sync", "local_sgd"]  # newest first
        assert all(r["status"] == "finished" for r in runs)
        run = _get_json(f"{link}/runs/{runs[0]['run']}.json")
        assert len(run["epochs"]) == 3
        assert run["rounds"] and {r["round"] for r in run["rounds"]} == set(
            range(len(run["rounds"])))
        assert {row[0] for row in run["rounds"][-1]["per_replica"]} == {0, 1}
        with urllib.request.urlopen(link, timeout=10) as response:
            assert b"daskdist training" in response.read()


def test_compat_adds_routes_to_a_running_scheduler_once():
    """Fails loudly when distributed changes what daskdist relies on."""
    with LocalCluster(n_workers=0, processes=False, dashboard_address="127.0.0.1:0") as cluster:
        scheduler = cluster.scheduler
        assert hasattr(scheduler, "http_application")
        add_http_routes(scheduler, routes)
        rules = len(scheduler.http_application.default_router.rules)
        add_http_routes(scheduler, routes)
        assert len(scheduler.http_application.default_router.rules) == rules
        assert http_routes_added(scheduler, routes)
        port = scheduler.http_server.port
        runs = _get_json(f"http://127.0.0.1:{port}/daskdist/runs.json")
        assert runs == {"monitor": False, "runs": []}


def test_compat_reads_task_states_on_the_scheduler(client):
    future = client.submit(sum, [1, 2], key="daskdist-compat-check")
    assert future.result() == 3
    (holders,) = client.run_on_scheduler(who_has, [future.key])
    assert holders == sorted(client.who_has(future)[future.key])
    assert client.run_on_scheduler(task_state, future.key) == "memory"
    assert client.run_on_scheduler(task_state, "daskdist-no-such-key") is None
    assert sorted(workers(client)) == sorted(client.nthreads())
    assert all(info["memory_limit"] > 0 for info in workers(client).values())
    # what reschedule_stranded reads and calls (tests/test_faults.py strands tasks for real)
    assert client.run_on_scheduler(reschedule_stranded, "daskdist-compat") == []
    assert client.run_on_scheduler(_scheduler_has, ["unrunnable", "running", "valid_workers",
                                                    "transitions", "tasks"])


def _scheduler_has(names, dask_scheduler=None):
    return all(hasattr(dask_scheduler, name) for name in names)


def test_progress_bar_shows_rounds_and_loss_unless_verbose_is_0(client, capsys):
    X, y = make_classification(1200)
    _net(client, verbose=1, max_epochs=2).fit(X, y)
    err = capsys.readouterr().err
    assert re.search(r"daskdist: .*\d+/\d+ .*round.*epoch=\d, loss=\d", err), err[-500:]
    _net(client, verbose=0, max_epochs=2).fit(X, y)
    assert "daskdist:" not in capsys.readouterr().err


def _chromium():
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


def _headless(browser, *args, timeout=60):
    cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
           "--hide-scrollbars", "--virtual-time-budget=4000", *args]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


@pytest.mark.timeout(240)
def test_the_page_shows_a_live_fit_in_chromium(client, digits):
    browser = _chromium()
    if browser is None:
        pytest.skip("Chromium is not installed (.ci/run installs Debian's chromium)")
    X, y = digits
    net = DaskNeuralNetClassifier(
        TinyNet, module__n_features=64, module__n_outputs=10, max_epochs=40, lr=0.1,
        batch_size=64, strategy="local_sgd", sync_every=4, verbose=0, random_state=0,
        scheduler_address=client.scheduler.address)
    link = client.dashboard_link.replace("/status", "/daskdist")
    fit = threading.Thread(target=net.fit, args=(X, y))
    fit.start()
    try:
        deadline = time.time() + 120
        while time.time() < deadline:  # until the run has a few epochs to show
            runs = _get_json(link + "/runs.json")["runs"]
            if runs and runs[0]["status"] == "running" and runs[0]["epochs"] >= 2:
                break
            time.sleep(0.2)
        else:
            pytest.fail(f"the run never showed up on {link}")
        dom = _headless(browser, "--dump-dom", link)
        OUTPUTS.mkdir(exist_ok=True)
        shot = OUTPUTS / "daskdist-page.png"
        _headless(browser, f"--screenshot={shot}", "--window-size=1500,1150", link)
        assert fit.is_alive()  # both views were taken during the fit
    finally:
        fit.join()
    replicas = re.findall(r'data-replica="(\d+)" data-points="(\d+)"', dom)
    assert len({r for r, n in replicas if int(n) >= 2}) >= 2, dom[:2000]
    assert re.search(r'data-series="global" data-points="(\d{2,})"', dom)
    assert "running" in dom
    assert shot.stat().st_size > 10_000
