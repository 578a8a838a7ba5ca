"""Old import paths of modules that moved, kept for one release.

Importing a module by its old name (``daskdist.engine``, say) warns with a
``DeprecationWarning`` and gives the module at its new place; pickles that
name the old path load too.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

#: Old module name -> new module name (submodules of a moved package follow it).
MOVED = {
    "daskdist.engine": "daskdist.driver.trainer",
    "daskdist.replica": "daskdist.worker.replica",
    "daskdist.aggregation": "daskdist.worker.aggregation",
    "daskdist.devices": "daskdist.worker.devices",
    "daskdist.process_group": "daskdist.worker.process_group",
    "daskdist.stages": "daskdist.worker.stages",
    "daskdist.stage_tasks": "daskdist.worker.stage_tasks",
    "daskdist.strategies.delta_exchange": "daskdist.worker.delta_tasks",
    "daskdist.strategies.group_exchange": "daskdist.worker.group_tasks",
    "daskdist.inputs": "daskdist.data.inputs",
    "daskdist.validation": "daskdist.data.validation",
    "daskdist.sources": "daskdist.data.sources",
    "daskdist.sharding": "daskdist.data.sharding",
    "daskdist.shards": "daskdist.data.shards",
    "daskdist.streaming": "daskdist.data.streaming",
    "daskdist.clients": "daskdist.clusters.embedded",
    "daskdist.cluster_spec": "daskdist.clusters",
    "daskdist.pipeline": "daskdist.batch",
}


def new_name(name: str) -> str | None:
    """The module's new name, or None when ``name`` did not move."""
    for old, new in MOVED.items():
        if name == old or name.startswith(old + "."):
            return new + name[len(old):]
    return None


def _caller_level() -> int:
    """The ``stacklevel`` of the first frame outside the import machinery."""
    frame, level = sys._getframe(1), 1
    while frame is not None and (frame.f_code.co_filename.startswith("<frozen")
                                 or frame.f_code.co_filename == __file__):
        frame, level = frame.f_back, level + 1
    return level


class MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds a moved module under its old name (installed by ``daskdist/__init__``)."""

    def find_spec(self, fullname, path=None, target=None):
        """A spec for an old module name; None for any other."""
        if new_name(fullname) is None:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec):
        """Warn, and give the module at its new place."""
        new = new_name(spec.name)
        warnings.warn(f"{spec.name} moved to {new}; the old name will be removed in the next "
                      "release.", DeprecationWarning, stacklevel=_caller_level())
        return importlib.import_module(new)

    def exec_module(self, module) -> None:
        """Nothing to run: the module was imported at its new place."""


def install() -> None:
    """Put the finder in front of the import system's (once)."""
    if not any(isinstance(f, MovedModules) for f in sys.meta_path):
        sys.meta_path.insert(0, MovedModules())
