"""The ``slurm`` cluster spec on a real, single-node Slurm cluster (:mod:`daskdist.testing.slurm`).

Starts ``munged``, ``slurmctld`` and ``slurmd`` on this machine (installing
Debian's packages when they are missing), submits the workers as real batch
jobs through dask-jobqueue, and stops everything at the end. Skipped, with the
reason, where that cannot be done (not root, no apt-get); CI sets
``DASKDIST_REQUIRE=slurm`` to make such a skip a failure.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import time

import pytest
from skorch.callbacks import Callback

from daskdist import DaskNeuralNetClassifier
from daskdist.cli import main
from daskdist.clusters import load_cluster_spec
from daskdist.testing import TinyNet
from daskdist.testing.required import skip_unless_available
from daskdist.testing.slurm import LocalSlurm, unavailable

ROOT = pathlib.Path(__file__).parents[1]
pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def slurm():
    skip_unless_available("slurm", unavailable(install=True))
    with LocalSlurm() as running:
        yield running
    assert not running.running() or running._reused


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    """Run from a scratch folder: the shipped spec writes job logs to ./slurm-logs."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_daskdist_require_turns_a_skip_into_a_failure(monkeypatch):
    monkeypatch.setenv("DASKDIST_REQUIRE", "ssh, slurm")
    with pytest.raises(pytest.fail.Exception, match="slurm is required here .*: no Slurm"):
        skip_unless_available("slurm", "no Slurm")
    with pytest.raises(pytest.skip.Exception, match="kubernetes: no cluster"):
        skip_unless_available("kubernetes", "no cluster")
    skip_unless_available("slurm", None)  # available: nothing happens
    monkeypatch.delenv("DASKDIST_REQUIRE")
    with pytest.raises(pytest.skip.Exception, match="slurm: no Slurm"):
        skip_unless_available("slurm", "no Slurm")


def _queue_empty(slurm, timeout=30.0) -> bool:
    end = time.monotonic() + timeout
    while slurm.jobs() and time.monotonic() < end:
        time.sleep(0.5)
    return not slurm.jobs()


def test_the_default_pipeline_runs_on_slurm_batch_jobs(slurm, in_tmp, capsys):
    """``daskdist run pipelines/digits-mlp.yaml --cluster slurm``, with the shipped spec."""
    code = main(["run", str(ROOT / "pipelines" / "digits-mlp.yaml"), "--cluster", "slurm",
                 "--output", str(in_tmp / "run"), "--set", "train.max_epochs=8", "--quiet"])
    assert code == 0, capsys.readouterr().err
    run = in_tmp / "run"
    for name in ("metrics.json", "report.md", "pipeline.yaml", "predictions.zarr",
                 "checkpoint", "loss.png"):
        assert (run / name).exists(), name
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["cluster"] == "slurm" and metrics["n_workers"] == 2
    assert metrics["metrics"]["accuracy"] > 0.9
    # the workers were batch jobs: each wrote its log where the spec says, and registered
    logs = sorted((in_tmp / "slurm-logs").glob("*.err"))
    assert len(logs) == 2
    for log in logs:
        assert "Registered to" in log.read_text()
    assert _queue_empty(slurm)  # closing the cluster cancelled the jobs


class CancelJobAt(Callback):
    """``scancel`` a worker's batch job when epoch ``epoch`` ends."""

    def __init__(self, job_id, epoch=2):
        self.job_id = job_id
        self.epoch = epoch

    def on_epoch_end(self, net, **kwargs):
        if len(net.history) == self.epoch:
            subprocess.run(["scancel", self.job_id], check=True)
            time.sleep(2)  # let the job's worker go before the next epoch starts


def test_a_job_cancelled_mid_fit_is_a_lost_worker(slurm, in_tmp, digits):
    spec = load_cluster_spec("slurm", overrides={"timeout": "2 minutes"})
    X, y = digits
    with spec.connect() as client:
        jobs = client.run(lambda: os.environ["SLURM_JOB_ID"])
        assert len(set(jobs.values())) == 2  # one worker per job
        victim_worker, victim = min(jobs.items(), key=lambda item: item[1])
        net = DaskNeuralNetClassifier(
            TinyNet, module__n_features=64, module__hidden=32, module__n_outputs=10,
            max_epochs=5, lr=0.2, batch_size=64, strategy="local_sgd", sync_every=4,
            train_split=None, verbose=0, random_state=0, callbacks=[CancelJobAt(victim)],
            scheduler_address=client.scheduler.address)
        net.fit(X, y)
        assert len(client.scheduler_info()["workers"]) == 1
    assert victim not in {job for job, *_ in slurm.jobs()}
    assert len(net.history) == 5
    # the job's worker went between epochs 2 and 3: the fit noticed, either as a lost worker
    # (recovered in epoch 3) or, at the epoch boundary, as a worker that left
    # (docs/elastic.md), and trained on the other worker from then on
    noticed = net.rounds_.loc[net.rounds_["membership"] != "", ["epoch", "membership"]]
    assert len(net.recoveries_) + len(noticed) >= 1
    assert net.recoveries_["reason"].str.contains("lost with a worker").all()
    assert set(net.recoveries_["epoch"]) | set(noticed["epoch"]) <= {2, 3}
    assert all(f"left {victim_worker}" in text for text in noticed["membership"])
    assert net.score(X, y) > 0.9


def test_jobs_that_stay_pending_end_in_an_error_naming_their_state(slurm, in_tmp):
    spec = load_cluster_spec("slurm", overrides={
        "timeout": 5, "jobqueue.job_extra_directives": ["--begin=now+1hour"]})
    with pytest.raises(TimeoutError) as raised:
        with spec.connect():
            pass
    message = str(raised.value)
    assert "only 0 of 2 worker(s) connected within 5 s" in message
    assert message.count("PENDING, reason BeginTime") == 2, message
    assert _queue_empty(slurm)  # the pending jobs were cancelled on the way out
