"""The README's main job, through the console script."""

import subprocess
import sys

import pytest


@pytest.mark.timeout(240)
def test_daskdist_run_trains_digits_and_reports():
    out = subprocess.run(
        [sys.executable, "-m", "daskdist.cli", "run", "--epochs", "12", "--workers", "2"],
        capture_output=True, text=True, timeout=200, check=True,
    ).stdout
    assert "test accuracy:" in out
    accuracy = float(out.split("test accuracy:")[1].split()[0])
    assert accuracy > 0.9
    assert "samples/s" in out and "dashboard was at: http" in out
