"""Splitting a ``torch.nn.Sequential`` into pipeline stages, and its state with it.

A pipeline-parallel fit (``strategy="pipeline"``) trains each stage — a run of
consecutive children of the model's :class:`torch.nn.Sequential` — on a worker
of its own. This module owns the bookkeeping that lets every step run
without any worker holding the whole model (only at an epoch's start and end
does one worker cut the whole state into parts and put it together again):
where the stages split (:func:`plan_stages`), the per-stage model
specification sent to the stage's worker (:func:`stage_spec`), and how the
fit's one
:class:`~daskdist.state.TrainingState` (a flat parameter vector, buffers by
name, an optimizer ``state_dict``) is cut into stage parts at the start of an
epoch (:func:`split_state`) and put together again at its end
(:func:`join_states`).

Slicing a ``Sequential`` keeps its children's names, so a stage's parameters
and buffers are named as in the whole model (``"2.weight"``), and skorch's
``optimizer__param_groups`` patterns match them as they do the whole model.
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

__all__ = ["StageLayout", "StagePart", "plan_stages", "balanced_split", "stage_spec",
           "finish_stages",
           "split_state", "join_states"]


@dataclass(frozen=True)
class StageLayout:
    """Where one stage sits in the whole model.

    Attributes
    ----------
    index : int
        The stage's position in the pipeline.
    children : tuple of str
        Names of the ``Sequential``'s children that make up the stage.
    start, stop : int
        The stage's slice of the flat parameter vector.
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
    start: int
    stop: int
    groups: tuple
    group_options: tuple
    optimizer_index: tuple
    full_groups: tuple
    buffers: tuple

    @property
    def n_params(self) -> int:
        """Entries of the stage's slice of the parameter vector."""
        return self.stop - self.start


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


def plan_stages(spec: ModelSpec, n_stages: int, split_points=None) -> list[StageLayout]:
    """The stages of the spec's ``Sequential``, split at ``split_points`` or balanced.

    Raises ``ValueError`` (before anything is sent to the cluster) for a
    module that is not a ``Sequential``, more stages than children, invalid
    split points, a stage without parameters, or a parameter shared by two
    stages.
    """
    module = spec.module
    if not isinstance(module, torch.nn.Sequential):
        raise ValueError(
            f"strategy='pipeline' splits a torch.nn.Sequential into stages; the module is a "
            f"{type(module).__name__}. Write the model as nn.Sequential(...) of its layers "
            "(or of your own stage modules, one child per stage).")
    names = list(module._modules)
    if n_stages > len(names):
        raise ValueError(
            f"n_stages={n_stages} is more than the {len(names)} children of the Sequential; "
            "each stage needs at least one child.")
    counts = [sum(p.numel() for p in module[i].parameters()) for i in range(len(names))]
    points = (balanced_split(counts, n_stages) if split_points is None
              else _check_split_points(split_points, len(names), n_stages))
    bounds = list(zip([0, *points], [*points, len(names)]))

    owner = {}
    for s, (a, b) in enumerate(bounds):
        for i in range(a, b):
            for p in module[i].parameters():
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
        own = [n for n in full_names if n.split(".", 1)[0] in children]
        if not own:
            raise ValueError(
                f"Stage {s} (children {list(children)}) has no parameters to train; move a "
                "split point so that every stage holds some.")
        first, last = position[own[0]], position[own[-1]]
        groups = tuple(tuple(n for n in g if n in own) for g in group_names)
        layouts.append(StageLayout(
            index=s, children=children, start=int(offsets[first]), stop=int(offsets[last + 1]),
            groups=groups, group_options=options,
            optimizer_index=tuple(index_of[n] for g in groups for n in g),
            full_groups=tuple(full_groups),
            buffers=tuple(n for n, _ in module.named_buffers()
                          if n.split(".", 1)[0] in children)))
    return layouts


def stage_spec(spec: ModelSpec, layout: StageLayout) -> ModelSpec:
    """The model specification a stage's worker gets: only the stage's children."""
    module = torch.nn.Sequential()
    for name in layout.children:
        module.add_module(name, spec.module._modules[name])
    kwargs = {k: v for k, v in spec.optimizer_kwargs.items() if k != "param_groups"}
    return replace(spec, module=module, optimizer_kwargs=kwargs)


def build_stage(spec: ModelSpec, layout: StageLayout):
    """A stage's live module and optimizer (every group of the whole model's, maybe empty)."""
    import copy

    module = copy.deepcopy(spec.module).to(spec.device_here())
    named = dict(module.named_parameters())
    groups = [{"params": [named[n] for n in names], **options}
              for names, options in zip(layout.groups, layout.group_options)]
    return module, spec.optimizer(groups, **spec.optimizer_kwargs)


def split_state(state: TrainingState, layout: StageLayout) -> StagePart:
    """The stage's part of a whole training state."""
    return StagePart(
        stage=layout.index,
        params=np.array(state.params[layout.start:layout.stop]),
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
    params = np.concatenate([p.params for p in parts])
    if params.shape != state.params.shape:
        raise ValueError(f"The stages hold {params.size} parameters, the model "
                         f"{state.params.size}.")
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
    """The epoch's final state from every stage's part (the pipeline's ``average`` task)."""
    first = min(parts, key=lambda p: p.stage)
    records = first.records
    applied = sum(1 for r in records if not r["skipped"])
    return join_states(
        state, parts, layouts, step=state.step + applied, round=state.round + plan.n_steps,
        epoch=plan.epochs_completed(), skipped=first.skipped,
        log=(state.log if plan.first_step else ()) + tuple(records), cursors=())
