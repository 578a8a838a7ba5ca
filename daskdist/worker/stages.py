"""Splitting a model into pipeline stages, and its state with it.

A pipeline-parallel fit (``strategy="pipeline"``) trains each stage — a run of
consecutive *units* of the model — on a worker of its own. The units are the
children of a :class:`torch.nn.Sequential`, or the sub-modules that a
model's ``stages()`` method returns, in order: called one after another on
the input, they must give the model's forward pass (:func:`stage_units`).
This module owns the bookkeeping that lets every step run
without any worker holding the whole model (only at an epoch's start and end
does one worker cut the whole state into parts and put it together again):
where the stages split (:func:`plan_stages`), the per-stage model
specification sent to the stage's worker (:func:`stage_spec`), and how the
fit's one
:class:`~daskdist.state.TrainingState` (a flat parameter vector, buffers by
name, an optimizer ``state_dict``) is cut into stage parts at the start of an
epoch (:func:`split_state`) and put together again at its end
(:func:`join_states`).

A stage's module (:class:`StageModule`) keeps its units at their paths in the
whole model, so a stage's parameters and buffers are named as in the whole
model (``"2.weight"``, ``"blocks.0.mlp.0.weight"``), and skorch's
``optimizer__param_groups`` patterns match them as they do the whole model.
A stage's parameters need not be contiguous in the whole model's flat
parameter vector (a head registered before the blocks it follows): each
layout lists its slices of it.
A stage's optimizer has every parameter group of the whole model's (those
without parameters of the stage are empty), so per-group learning rates and
options carry over unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch

from ..spec import ModelSpec, param_groups
from ..state import TrainingState
from .stage_build import initialise, on_meta

__all__ = ["StageLayout", "StageModule", "StagePart", "stage_units", "plan_stages", "materialise",
           "balanced_split", "stage_spec", "finish_stages", "split_state", "join_states"]


@dataclass(frozen=True)
class StageLayout:
    """Where one stage sits in the whole model.

    Attributes
    ----------
    index : int
        The stage's position in the pipeline.
    children : tuple of str
        Paths in the whole model of the units that make up the stage (a
        ``Sequential``'s child names, or ``"blocks.0"``).
    slices : tuple of (int, int)
        The stage's slices of the whole model's flat parameter vector, in
        the order of the stage module's parameters.
    groups : tuple of tuple of str
        For each parameter group of the whole model's optimizer, the names of
        the stage's parameters in it (in order; maybe none).
    group_options : tuple of dict
        Each group's options from ``optimizer__param_groups``.
    optimizer_index : tuple of int
        For each parameter of the stage's optimizer (in its order), its index
        in the whole model's optimizer ``state_dict``.
    full_groups : tuple of tuple of int
        The whole optimizer's ``param_groups[g]["params"]`` indices.
    buffers : tuple of str
        Names of the stage's buffers.
    """

    index: int
    children: tuple
    slices: tuple
    groups: tuple
    group_options: tuple
    optimizer_index: tuple
    full_groups: tuple
    buffers: tuple

    @property
    def n_params(self) -> int:
        """Entries of the stage's slices of the parameter vector."""
        return sum(b - a for a, b in self.slices)


class StageModule(torch.nn.Module):
    """A stage: its units at their paths in the whole model, called one after another.

    ``StageModule([("blocks.0", block0), ("blocks.1", block1)])`` names its
    parameters ``blocks.0.…`` and ``blocks.1.…``, as the whole model does;
    its forward pass is ``block1(block0(x))``.
    """

    def __init__(self, units):
        super().__init__()
        self.paths = tuple(path for path, _ in units)
        for path, module in units:
            *parents, leaf = path.split(".")
            node = self
            for name in parents:
                if name not in node._modules:
                    node.add_module(name, torch.nn.Module())
                node = node._modules[name]
            node.add_module(leaf, module)

    def forward(self, x):
        """The stage's units, one after another."""
        for path in self.paths:
            x = self.get_submodule(path)(x)
        return x


def stage_units(module: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """The units a model's stages are cut from, in order: ``(path, sub-module)`` pairs.

    A ``Sequential``'s children; or, for another module, what its
    ``stages()`` method returns: sub-modules of the model that, called one
    after another on the input, give its forward pass. Every parameter and
    buffer must sit in one of them. Raises ``ValueError`` saying how to make
    a model splittable otherwise.
    """
    if isinstance(module, torch.nn.Sequential):
        return list(module._modules.items())
    declared = getattr(module, "stages", None)
    if not callable(declared):
        raise ValueError(
            f"strategy='pipeline' splits a torch.nn.Sequential into stages, or a module whose "
            f"stages() method returns its ordered sub-modules; the module is a "
            f"{type(module).__name__}, which has neither. Write the model as "
            "nn.Sequential(...) of its layers, or give it a stages() method returning the "
            "sub-modules that, called one after another on the input, make its forward pass "
            "(see the pipeline section of docs/strategies.md).")
    paths = {id(m): name for name, m in module.named_modules()}
    units, seen = [], set()
    for unit in declared():
        if not isinstance(unit, torch.nn.Module) or not paths.get(id(unit)):
            raise ValueError(
                f"{type(module).__name__}.stages() must return sub-modules of the model "
                f"(attributes of it, at any depth), got {type(unit).__name__}.")
        if id(unit) in seen:
            raise ValueError(f"{type(module).__name__}.stages() returns "
                             f"{paths[id(unit)]!r} twice; each sub-module is one unit.")
        seen.add(id(unit))
        units.append((paths[id(unit)], unit))
    for a, _ in units:
        for b, _ in units:
            if a != b and b.startswith(a + "."):
                raise ValueError(f"{type(module).__name__}.stages() returns {a!r} and "
                                 f"{b!r}, which lies inside it.")
    covered = {id(t) for _, unit in units
               for t in (*unit.parameters(), *unit.buffers())}
    left = [n for n, t in (*module.named_parameters(), *module.named_buffers())
            if id(t) not in covered]
    if not units or left:
        raise ValueError(
            f"{type(module).__name__}.stages() leaves out {left or 'everything'}: every "
            "parameter and buffer must sit in one of the sub-modules it returns.")
    return units


@dataclass
class StagePart:
    """One stage's share of a training state: its parameters, buffers and optimizer state.

    ``skipped`` is the fit's count of skipped (non-finite) steps; at the end
    of an epoch the first stage's part also carries the epoch's round log,
    ``records``.
    """

    stage: int
    params: np.ndarray
    buffers: dict
    optimizer: dict
    records: tuple = ()
    skipped: int = 0

    @property
    def nbytes(self) -> int:
        """Bytes of array data in the part."""
        from ..state import tree_nbytes

        return tree_nbytes((self.params, self.buffers, self.optimizer))

    def __sizeof__(self) -> int:
        return object.__sizeof__(self) + self.nbytes


def balanced_split(sizes, n_stages: int) -> list[int]:
    """Split points that balance ``sizes`` over ``n_stages`` consecutive, non-empty runs.

    Minimises the largest run's total (each child's size is its parameter
    count, a stand-in for its compute). Returns the ``n_stages - 1`` indices
    at which stages 1, 2, ... begin.
    """
    sizes = [int(s) for s in sizes]
    n = len(sizes)
    if not 1 <= n_stages <= n:
        raise ValueError(f"Cannot split {n} children into {n_stages} stages.")
    prefix = np.concatenate([[0], np.cumsum(sizes)])
    # best[k][i]: the best split of children[:i] into k runs, scored by (largest run's
    # total, runs without parameters); ties take the later cut, so that parameterless
    # children (activations) stay with the layer before them
    worst = (float("inf"), n)
    best = [[worst] * (n + 1) for _ in range(n_stages + 1)]
    cut = [[0] * (n + 1) for _ in range(n_stages + 1)]
    best[0][0] = (0, 0)
    for k in range(1, n_stages + 1):
        for i in range(k, n + 1):
            for j in range(k - 1, i):
                run = int(prefix[i] - prefix[j])
                score = (max(best[k - 1][j][0], run), best[k - 1][j][1] + (run == 0))
                if score <= best[k][i]:
                    best[k][i], cut[k][i] = score, j
    points, i = [], n
    for k in range(n_stages, 0, -1):
        i = cut[k][i]
        points.append(i)
    return sorted(points)[1:]


def _check_split_points(split_points, n_children: int, n_stages: int) -> list[int]:
    points = list(split_points)
    if any(isinstance(p, bool) or not isinstance(p, (int, np.integer)) for p in points):
        raise ValueError(f"split_points must be child indices (integers), got {split_points!r}.")
    points = [int(p) for p in points]
    if len(points) != n_stages - 1:
        raise ValueError(
            f"split_points {points} give {len(points) + 1} stages, but n_stages={n_stages}; "
            "give n_stages - 1 indices of the children at which stages 2, 3, ... begin.")
    if points != sorted(set(points)) or (points and not 0 < points[0] <= points[-1] < n_children):
        raise ValueError(
            f"split_points must increase strictly and lie in 1..{n_children - 1} (the model "
            f"has {n_children} children), got {points}.")
    return points


def materialise(module: torch.nn.Module, random_state: int, device="cpu") -> torch.nn.Module:
    """The whole model from its ``meta`` recipe, initialised as the workers initialise stages.

    Needs the memory of the whole model: for tests and references
    (:mod:`daskdist.worker.stage_build`).
    """
    import copy

    paths = [path for path, _ in stage_units(module)]
    return initialise(copy.deepcopy(module), paths, random_state, device)


def plan_stages(spec: ModelSpec, n_stages: int, split_points=None) -> list[StageLayout]:
    """The stages of the spec's model, split at ``split_points`` or balanced.

    The model is a ``Sequential`` or declares its units with ``stages()``
    (:func:`stage_units`). Raises ``ValueError`` (before anything is sent to
    the cluster) for a model that is neither, more stages than units,
    invalid split points, a stage without parameters, or a parameter shared
    by two stages.
    """
    module = spec.module
    units = stage_units(module)
    names = [path for path, _ in units]
    if n_stages > len(names):
        raise ValueError(
            f"n_stages={n_stages} is more than the {len(names)} children of the "
            f"{type(module).__name__}; each stage needs at least one child.")
    counts = [sum(p.numel() for p in unit.parameters()) for _, unit in units]
    points = (balanced_split(counts, n_stages) if split_points is None
              else _check_split_points(split_points, len(names), n_stages))
    bounds = list(zip([0, *points], [*points, len(names)]))

    owner = {}
    for s, (a, b) in enumerate(bounds):
        for i in range(a, b):
            for p in units[i][1].parameters():
                if owner.setdefault(id(p), s) != s:
                    raise ValueError(
                        f"A parameter of child {names[i]!r} is shared with stage {owner[id(p)]} "
                        f"(stage {s} holds it too); tied parameters must sit in one stage: "
                        "move a split point.")
    full_names = [n for n, _ in module.named_parameters()]
    kwargs = dict(spec.optimizer_kwargs)
    named = list(module.named_parameters())
    by_id = {id(p): n for n, p in named}
    full = param_groups(named, kwargs.get("param_groups", []))
    full_order = [by_id[id(p)] for g in full for p in g["params"]]  # the optimizer's indices
    index_of = {n: i for i, n in enumerate(full_order)}
    full_groups, start = [], 0
    for g in full:
        full_groups.append(tuple(range(start, start + len(g["params"]))))
        start += len(g["params"])
    options = tuple({k: v for k, v in g.items() if k != "params"} for g in full)
    group_names = [[by_id[id(p)] for p in g["params"]] for g in full]

    offsets = np.concatenate([[0], np.cumsum([p.numel() for _, p in named])])
    position = {n: i for i, n in enumerate(full_names)}
    layouts = []
    for s, (a, b) in enumerate(bounds):
        children = tuple(names[a:b])
        stage = StageModule(units[a:b])  # (shares the units: nothing is copied)
        own = [n for n, _ in stage.named_parameters()]
        if not own:
            raise ValueError(
                f"Stage {s} (children {list(children)}) has no parameters to train; move a "
                "split point so that every stage holds some.")
        groups = tuple(tuple(n for n in g if n in own) for g in group_names)
        layouts.append(StageLayout(
            index=s, children=children,
            slices=_runs([(int(offsets[position[n]]), int(offsets[position[n] + 1]))
                          for n in own]),
            groups=groups, group_options=options,
            optimizer_index=tuple(index_of[n] for g in groups for n in g),
            full_groups=tuple(full_groups),
            buffers=tuple(n for n, _ in stage.named_buffers())))
    return layouts


def _runs(slices) -> tuple:
    """``slices`` with each one that starts where the one before ends merged into it."""
    runs = []
    for a, b in slices:
        if runs and runs[-1][1] == a:
            runs[-1] = (runs[-1][0], b)
        else:
            runs.append((a, b))
    return tuple(runs)


def stage_spec(spec: ModelSpec, layout: StageLayout) -> ModelSpec:
    """The model specification a stage's worker gets: only the stage's units."""
    module = StageModule([(path, spec.module.get_submodule(path)) for path in layout.children])
    kwargs = {k: v for k, v in spec.optimizer_kwargs.items() if k != "param_groups"}
    return replace(spec, module=module, optimizer_kwargs=kwargs)


def build_stage(spec: ModelSpec, layout: StageLayout, random_state: int | None = None):
    """A stage's live module and optimizer (every group of the whole model's, maybe empty).

    A stage whose units are on ``meta`` is allocated and initialised here,
    from ``random_state`` (:mod:`daskdist.worker.stage_build`).
    """
    import copy

    module = copy.deepcopy(spec.module)
    if on_meta(module):
        module = initialise(module, layout.children, random_state, spec.device_here())
    else:
        module = module.to(spec.device_here())
    named = dict(module.named_parameters())
    groups = [{"params": [named[n] for n in names], **options}
              for names, options in zip(layout.groups, layout.group_options)]
    return module, spec.optimizer(groups, **spec.optimizer_kwargs)


def split_state(state: TrainingState, layout: StageLayout) -> StagePart:
    """The stage's part of a whole training state."""
    return StagePart(
        stage=layout.index,
        params=np.concatenate([state.params[a:b] for a, b in layout.slices]),
        buffers={n: state.buffers[n] for n in layout.buffers if n in state.buffers},
        optimizer=_slice_optimizer(state.optimizer, layout), skipped=state.skipped)


def _slice_optimizer(full: dict, layout: StageLayout) -> dict:
    if not full:
        return {}
    state = full.get("state", {})
    own = {j: state[i] for j, i in enumerate(layout.optimizer_index) if i in state}
    groups, start = [], 0
    for g, names in zip(full["param_groups"], layout.groups):
        groups.append({**g, "params": list(range(start, start + len(names)))})
        start += len(names)
    return {"state": own, "param_groups": groups}


def join_states(state: TrainingState, parts, layouts, **counters) -> TrainingState:
    """A whole training state from every stage's part (``counters``: step, round, ...)."""
    parts = sorted(parts, key=lambda p: p.stage)
    held = sum(p.params.size for p in parts)
    if held != state.params.size:
        raise ValueError(f"The stages hold {held} parameters, the model "
                         f"{state.params.size}.")
    params = np.empty_like(state.params)
    for part, layout in zip(parts, layouts):
        offset = 0
        for a, b in layout.slices:
            params[a:b] = part.params[offset:offset + b - a]
            offset += b - a
    buffers = dict(state.buffers)
    for p in parts:
        buffers.update(p.buffers)
    return replace(state, params=params, buffers=buffers,
                   optimizer=_join_optimizer(parts, layouts), **counters)


def _join_optimizer(parts, layouts) -> dict:
    if not any(p.optimizer for p in parts):
        return {}
    full_state = {}
    for part, layout in zip(parts, layouts):
        inner = part.optimizer.get("state", {})
        full_state.update((i, inner[j]) for j, i in enumerate(layout.optimizer_index)
                          if j in inner)
    param_groups = []
    for g, indices in enumerate(layouts[0].full_groups):
        # a group's options (its learning rate...) as a stage that trains it has them
        source = next((p for p, lay in zip(parts, layouts) if lay.groups[g]), parts[0])
        param_groups.append({**source.optimizer["param_groups"][g], "params": list(indices)})
    return {"state": dict(sorted(full_state.items())), "param_groups": param_groups}


def finish_stages(state: TrainingState, *parts, layouts, plan) -> TrainingState:
    """The epoch's final state from every stage's part (the pipeline's ``average`` task).

    Stages that keep their own state (``build="workers"``) send no tensors:
    the state then carries the counters and the round log only.
    """
    first = min(parts, key=lambda p: p.stage)
    records = first.records
    applied = sum(1 for r in records if not r["skipped"])
    counters = dict(step=state.step + applied, round=state.round + plan.n_steps,
                    epoch=plan.epochs_completed(), skipped=first.skipped,
                    log=(state.log if plan.first_step else ()) + tuple(records), cursors=())
    if not state.params.size:
        return replace(state, **counters)
    return join_states(state, parts, layouts, **counters)
