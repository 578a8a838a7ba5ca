"""dask-ml's incremental searches (``HyperbandSearchCV`` and kin) with the dask daskdist installs.

dask-ml 2025.1, its latest release, runs its incremental searches in a
coroutine on an asynchronous client and calls the top-level
``dask.persist`` there, which dask >= 2025.3 refuses ("Attempting to use an
asynchronous Client in a synchronous context", dask/dask-ml#1016), so every
search fails before its first ``partial_fit``. ``Client.persist`` itself
does not block and is safe there. This module gives dask-ml's search module
(:data:`TARGET`) a ``dask`` whose ``persist`` is :func:`persist`: the same
call through the default client that ``dask.persist`` makes for a
synchronous one. Nothing else in dask-ml, or in dask, changes.

``import daskdist`` installs it (:func:`install`) when the installed dask-ml
is one that needs it (:data:`LAST_AFFECTED`): at once if dask-ml's module is
already imported, otherwise when it is. ``tests/test_search.py`` runs a
search through it against the installed versions.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.metadata
import sys
import types

import dask
from packaging.version import Version

__all__ = ["TARGET", "LAST_AFFECTED", "needs_patch", "persist", "patch", "patched", "install"]

#: The module of dask-ml's incremental searches.
TARGET = "dask_ml.model_selection._incremental"
#: The newest dask-ml release known to call ``dask.persist`` on an asynchronous client.
LAST_AFFECTED = Version("2025.1.0")


def needs_patch() -> bool:
    """Whether the installed dask-ml is one that :func:`patch` is for."""
    try:
        installed = Version(importlib.metadata.version("dask-ml"))
    except importlib.metadata.PackageNotFoundError:
        return False
    return installed <= LAST_AFFECTED


def persist(*args, traverse: bool = True, optimize_graph: bool = True, **kwargs):
    """``dask.persist(*args)`` through the default client, asynchronous or not.

    Finds the collections among ``args`` (inside lists and dicts too, with
    ``traverse``), submits them with ``Client.persist`` and returns ``args``
    with each collection replaced by its persisted copy, as ``dask.persist``
    does; arguments without a collection come back as they are.
    """
    from dask.base import unpack_collections
    from distributed import default_client

    collections, repack = unpack_collections(*args, traverse=traverse)
    if not collections:
        return args
    return repack(default_client().persist(collections, optimize_graph=optimize_graph,
                                           **kwargs))


class _Dask(types.ModuleType):
    """``dask`` as dask-ml's search module sees it: :func:`persist` replaces ``dask.persist``."""

    def __getattr__(self, name):
        return getattr(dask, name)


def patch(module) -> None:
    """Give ``module`` (dask-ml's :data:`TARGET`) a ``dask`` with :func:`persist` in it."""
    shim = _Dask("dask", dask.__doc__)
    shim.persist = persist
    module.dask = shim


def patched(module) -> bool:
    """Whether :func:`patch` was applied to ``module``."""
    return isinstance(getattr(module, "dask", None), _Dask)


class _Patching(importlib.abc.Loader):
    """The loader of :data:`TARGET`, which patches the module once it has run."""

    def __init__(self, loader):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module) -> None:
        self.loader.exec_module(module)
        patch(module)

    def __getattr__(self, name):  # get_source, get_code, ...: the real loader's
        return getattr(self.loader, name)


class _PatchOnImport(importlib.abc.MetaPathFinder):
    """Finds :data:`TARGET` as the path finder does, with a loader that patches it."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != TARGET:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path, target)
        if spec is not None and spec.loader is not None:
            spec.loader = _Patching(spec.loader)
        return spec


def install() -> None:
    """Patch dask-ml's search module now or when it is imported, where it needs it (once)."""
    if not needs_patch():
        return
    module = sys.modules.get(TARGET)
    if module is not None:
        if not patched(module):
            patch(module)
    elif not any(isinstance(f, _PatchOnImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _PatchOnImport())
