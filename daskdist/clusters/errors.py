"""The error a cluster spec that cannot be used raises, and how it names files."""

from __future__ import annotations

import os
from pathlib import Path


class ClusterSpecError(ValueError):
    """A cluster spec that cannot be found, read or validated.

    The message is one line: the file, the field (a dotted path) and what was
    expected, e.g. ``cluster_specs/slurm.yaml: jobqueue.cores: expected an
    integer >= 1, got 'four'``.
    """


def display(path: Path) -> str:
    """The path relative to the working directory when it lies inside it."""
    relative = os.path.relpath(os.path.abspath(path))
    return str(path) if relative.startswith("..") else relative
