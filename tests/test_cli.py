"""The ``daskdist`` console script: commands, exit codes and one-line errors."""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def _command():
    """The installed console script (falling back to ``python -m daskdist.cli``)."""
    exe = shutil.which("daskdist", path=str(Path(sys.executable).parent))
    return [exe] if exe else [sys.executable, "-m", "daskdist.cli"]


def _daskdist(*args, cwd=ROOT, timeout=120):
    return subprocess.run([*_command(), *args], capture_output=True, text=True, cwd=cwd,
                          timeout=timeout)


def test_validate_accepts_the_shipped_pipelines():
    result = _daskdist("validate", *sorted(str(p) for p in (ROOT / "pipelines").glob("*.yaml")))
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("ok: ") >= 3


def test_invalid_input_exits_2_with_one_line_on_stderr(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"data": {"source": "sklearn", "name": "digits"},
                                   "model": {"module": "MLP"},
                                   "train": {"estimator": "classifier", "lr": "fast"}}))
    for args in (("validate", str(bad)), ("run", str(bad))):
        result = _daskdist(*args)
        assert result.returncode == 2
        assert result.stderr.strip() == (f"daskdist: error: {bad}: train.lr: expected a "
                                         "number, got 'fast'")
        assert result.stdout == ""
    spec = tmp_path / "spec.yaml"
    spec.write_text("backend: local\nworkers: many\n")
    result = _daskdist("cluster", str(spec), "--dry-run")
    assert result.returncode == 2
    assert result.stderr.startswith(f"daskdist: error: {spec}: workers: expected")
    assert len(result.stderr.strip().splitlines()) == 1
    result = _daskdist("run", "--no-such-option")
    assert result.returncode == 2  # argparse's usage error


@pytest.mark.parametrize("name, expected", [
    ("slurm", "#SBATCH --cpus-per-task=1"),
    ("pbs", "#PBS -l walltime=01:00:00"),
    ("kubernetes", "kind: DaskCluster"),
    ("local", "LocalCluster"),
])
def test_cluster_dry_run_renders_without_starting_anything(name, expected):
    result = _daskdist("cluster", name, "--dry-run")
    assert result.returncode == 0, result.stderr
    assert expected in result.stdout


@pytest.mark.timeout(120)
def test_a_failure_during_the_run_exits_1(tmp_path):
    """A scheduler that is not there: the run fails after validation, with exit code 1."""
    spec = tmp_path / "nowhere.yaml"
    spec.write_text("backend: address\naddress: tcp://127.0.0.1:9\ntimeout: 3\n")
    result = _daskdist("run", str(ROOT / "pipelines/digits-mlp.yaml"), "--cluster", str(spec),
                       "--output", str(tmp_path / "run"), cwd=tmp_path)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("daskdist: error: ")
    assert "127.0.0.1:9" in lines[-1]


@pytest.mark.timeout(180)
def test_run_prints_the_page_to_watch_and_keep_open_keeps_it_up(tmp_path):
    proc = subprocess.Popen(
        [*_command(), "run", "pipelines/digits-mlp.yaml", "--workers", "2", "--quiet",
         "--keep-open", "--output", str(tmp_path / "run"), "--set", "train.max_epochs=3"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if "stays up" in line:
                break
        text = "".join(lines)
        printed = re.search(r"watch the run at (http://\S+/daskdist)\n", text)
        assert printed, text
        assert f"run page at {printed.group(1)};" in lines[-1]
        with urllib.request.urlopen(printed.group(1) + "/runs.json", timeout=10) as response:
            runs = json.load(response)["runs"]
        assert [(r["status"], r["epochs"]) for r in runs] == [("finished", 3)]
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0, proc.stderr.read()
    finally:
        proc.kill()
