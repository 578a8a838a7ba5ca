"""The package's structure: no import cycles, no private names across modules, strategies
that see the driver only through their epoch context, modules of a readable size."""

from __future__ import annotations

import ast
import dataclasses
import importlib
import warnings
from pathlib import Path

import pytest

import daskdist
from daskdist.driver.context import EpochContext, EpochInfo

PACKAGE = Path(daskdist.__file__).resolve().parent
#: Module files longer than this are to be split.
MAX_LINES = 500


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _is_type_checking(node) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _nodes(tree):
    """Every node, but those under ``if TYPE_CHECKING:``."""
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                stack.extend(child.orelse)
                continue
            stack.append(child)


def _imports(name: str, path: Path):
    """``(imported module, imported names)`` of every import in a module, functions included."""
    is_package = path.name == "__init__.py"
    package = name if is_package else name.rpartition(".")[0]
    for node in _nodes(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, ()
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            yield module, tuple(a.name for a in node.names)
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str):
            func = node.func
            called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if called in ("import_module", "__import__"):
                yield node.args[0].value, ()


def _graph() -> dict:
    graph = {name: set() for name in MODULES}
    for name, path in MODULES.items():
        for module, names in _imports(name, path):
            if not module.startswith("daskdist"):
                continue
            targets = [f"{module}.{n}" for n in names if f"{module}.{n}" in MODULES]
            if len(targets) < len(names) or not names:  # names defined in the module itself
                targets.append(module)
            graph[name].update(t for t in targets if t in MODULES and t != name)
    return graph


def _cycles(graph: dict) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, on_stack, stack, found, counter = {}, {}, set(), [], [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_no_module_takes_part_in_an_import_cycle():
    # a package's __init__ importing its own modules, and they importing siblings through
    # the package, is how Python packages work: only cycles between modules count
    graph = _graph()
    for name in graph:
        graph[name] = {t for t in graph[name] if not (MODULES[t].name == "__init__.py"
                                                       and name.startswith(t + "."))}
    assert _cycles(graph) == []


def test_the_cycle_check_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_module_imports_another_modules_private_name():
    private = []
    for name, path in MODULES.items():
        for module, names in _imports(name, path):
            if not module.startswith("daskdist"):
                continue
            for n in names:
                # a private module of the package (``_compat``) is fine; a private name is not
                if n.startswith("_") and not n.startswith("__") and f"{module}.{n}" not in MODULES:
                    private.append(f"{name}: from {module} import {n}")
    assert private == []


def test_modules_are_of_a_readable_size():
    long = {name: n for name, path in MODULES.items()
            if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert long == {}


#: What a strategy may use of its epoch context.
CONTEXT = {f.name for f in dataclasses.fields(EpochContext) if not f.name.startswith("_")} | {
    name for name, value in vars(EpochContext).items()
    if not name.startswith("_") and callable(value)}
INFO = {f.name for f in dataclasses.fields(EpochInfo)} | {"done"}


def _context_uses(tree):
    """``(attribute, line)`` of every use of ``ctx.<attr>`` / ``self.ctx.<attr>`` and of info."""
    for node in ast.walk(tree):
        if not isinstance(node, ast.Attribute):
            continue
        value = node.value
        is_ctx = (isinstance(value, ast.Name) and value.id == "ctx") or (
            isinstance(value, ast.Attribute) and value.attr == "ctx")
        if is_ctx:
            yield "ctx", node.attr, node.lineno
        elif isinstance(value, ast.Attribute) and value.attr == "info" and (
                isinstance(value.value, ast.Name) and value.value.id == "ctx"
                or isinstance(value.value, ast.Attribute) and value.value.attr == "ctx"):
            yield "info", node.attr, node.lineno
        elif isinstance(value, ast.Name) and value.id == "info":
            yield "info", node.attr, node.lineno


STRATEGY_FILES = sorted((PACKAGE / "strategies").glob("*.py"))


@pytest.mark.parametrize("path", STRATEGY_FILES, ids=lambda p: p.name)
def test_strategies_see_the_driver_only_through_their_context(path):
    tree = ast.parse(path.read_text())
    wrong = [f"line {line}: {kind}.{attr}" for kind, attr, line in _context_uses(tree)
             if attr not in (CONTEXT if kind == "ctx" else INFO)]
    # no driver in reach: no Trainer, no ``trainer`` argument, no private attribute of one
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and node.id in ("trainer", "Trainer"):
            wrong.append(f"line {node.lineno}: {node.id}")
        if isinstance(node, ast.arg) and node.arg == "trainer":
            wrong.append(f"line {node.lineno}: argument trainer")
        # getattr with a literal name: an optional hook, or an attribute the strategy
        # should not need to guess at
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "getattr" \
                and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant):
            wrong.append(f"line {node.lineno}: getattr(..., {node.args[1].value!r})")
    assert wrong == []


def test_the_context_check_finds_a_use_of_the_drivers_internals():
    tree = ast.parse("def f(ctx):\n    ctx._driver.round += 1\n    return ctx.info.epoch\n")
    uses = list(_context_uses(tree))
    assert ("ctx", "_driver", 2) in uses and ("info", "epoch", 3) in uses
    assert "_driver" not in CONTEXT and "epoch" in INFO


def test_the_context_is_small():
    # the interface a strategy author learns (docs/architecture.md lists it)
    assert len(CONTEXT) <= 16
    documented = (PACKAGE.parent / "docs" / "architecture.md").read_text()
    assert all(f"`{member}" in documented for member in CONTEXT), sorted(
        m for m in CONTEXT if f"`{m}" not in documented)


@pytest.mark.parametrize("old, new", [
    ("daskdist.engine", "daskdist.driver.trainer"),
    ("daskdist.replica", "daskdist.worker.replica"),
    ("daskdist.pipeline", "daskdist.batch"),
    ("daskdist.pipeline.load", "daskdist.batch.load"),
    ("daskdist.cluster_spec", "daskdist.clusters"),
    ("daskdist.clients", "daskdist.clusters.embedded"),
    ("daskdist.shards", "daskdist.data.shards"),
])
def test_old_module_paths_still_import_with_a_deprecation_warning(old, new):
    import sys

    sys.modules.pop(old, None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        module = importlib.import_module(old)
    assert module is importlib.import_module(new)
    assert any(issubclass(w.category, DeprecationWarning) and new in str(w.message)
               for w in caught)
