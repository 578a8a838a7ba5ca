"""Skips that CI may turn into failures: ``DASKDIST_REQUIRE``.

Tests of real outside systems (a local Slurm cluster, SSH servers) skip, with
the reason, on machines that cannot run them. A CI run that must exercise
them sets ``DASKDIST_REQUIRE`` to a comma-separated list of their names
(``DASKDIST_REQUIRE=slurm,ssh``), and a skip of a listed name fails instead,
so that CI cannot pass by skipping what it was meant to test.
"""

from __future__ import annotations

import os

import pytest

__all__ = ["required", "skip_unless_available"]


def required() -> set[str]:
    """The names ``DASKDIST_REQUIRE`` lists."""
    return {name.strip() for name in os.environ.get("DASKDIST_REQUIRE", "").split(",")
            if name.strip()}


def skip_unless_available(name: str, reason: str | None) -> None:
    """Skip the calling test when ``reason`` is set, or fail if ``name`` is required.

    Parameters
    ----------
    name : str
        What the test needs, as ``DASKDIST_REQUIRE`` names it (``"slurm"``).
    reason : str or None
        Why it is not available here; None: it is, and nothing happens.
    """
    if reason is None:
        return
    if name in required():
        pytest.fail(f"{name} is required here (DASKDIST_REQUIRE) but not available: {reason}",
                    pytrace=False)
    pytest.skip(f"{name}: {reason}")
