"""The training state that travels between rounds, and the arithmetic on it.

A round is a pure function of a shard and a :class:`TrainingState`. The state
holds everything a replica needs to continue training: the parameters as one
flat vector, the module's buffers, the optimizer state and counters. Arrays are
numpy, so the state pickles cheaply and averages without torch.

Nested containers of arrays ("trees": dicts, lists and tuples whose leaves are
numpy arrays or plain values) are averaged leaf by leaf with
:func:`tree_weighted_sum` and :func:`tree_scale`.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np
import torch

from .compression import Packed, unpacked

__all__ = [
    "read_tensor",
    "TrainingState",
    "copy_flat",
    "grads_finite",
    "module_to_state",
    "load_buffers",
    "load_params",
    "mean_flat_into",
    "params_vector",
    "optimizer_state_to_numpy",
    "optimizer_state_from_numpy",
    "tree_add",
    "tree_diff",
    "tree_nbytes",
    "tree_scale",
    "tree_weighted_sum",
]


@dataclass(frozen=True)
class TrainingState:
    """Everything a replica needs to run the next round.

    Attributes
    ----------
    params : numpy.ndarray
        All parameters of the module, flattened in ``module.parameters()``
        order into one vector.
    buffers : dict of str to numpy.ndarray
        The module's buffers (for example batch-norm running statistics).
    optimizer : dict
        The optimizer's ``state_dict()`` with tensors as numpy arrays.
    step : int
        Optimizer steps taken so far in the whole fit.
    round : int
        Synchronisation rounds completed so far in the whole fit.
    epoch : int
        Epochs completed so far (a state from the middle of an epoch does
        not count that epoch).
    skipped : int
        Replica updates skipped so far in the whole fit because they were
        not finite (see :class:`daskdist.worker.replica.NonFiniteError`).
    log : tuple of dict
        One record per round completed in the current epoch (losses, samples,
        timings); reset at each epoch boundary.
    cursors : tuple of tuple of int
        Where each replica is in its shard, for strategies whose replicas move
        through their shards at their own pace (``async``, ``ssp``): one
        ``(pass, step, rounds)`` per replica — the pass over its shard, the
        next step in it, and the rounds of it applied so far. Empty for the
        others, whose replicas all are at the round's step.
    own : dict of str to dict
        What replicas (or groups of them) keep of their own, by owner
        (``"replica 0"``, ``"group 1"``): error-feedback residuals, their
        own optimizer state, fp16 loss scalers
        (:mod:`daskdist.worker.own_state`). Carried by an epoch's final
        state (and a state recovered after a lost worker); empty where
        replicas keep nothing of their own.
    outer : dict
        The outer optimizer's state, shared by every replica (``diloco``:
        ``{"momentum": vector}``, the outer SGD's momentum, laid out as
        ``params``); empty for other strategies.
    """

    params: np.ndarray
    buffers: dict = field(default_factory=dict)
    optimizer: dict = field(default_factory=dict)
    step: int = 0
    round: int = 0
    epoch: int = 0
    skipped: int = 0
    log: tuple = ()
    cursors: tuple = ()
    own: dict = field(default_factory=dict)
    outer: dict = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        """Bytes of array data that this state carries."""
        return tree_nbytes((self.params, self.buffers, self.optimizer, self.own, self.outer))

    def __sizeof__(self) -> int:
        # what Dask's memory accounting and task placement see (dask.sizeof)
        return object.__sizeof__(self) + self.nbytes


def params_vector(module: torch.nn.Module) -> np.ndarray:
    """Return the module's parameters as one flat numpy vector (a copy)."""
    params = list(module.parameters())
    if not params:
        raise ValueError(f"{type(module).__name__} has no parameters to train.")
    dtypes = {p.dtype for p in params}
    if len(dtypes) > 1:
        raise TypeError(
            f"{type(module).__name__} mixes parameter dtypes {sorted(map(str, dtypes))}; "
            "daskdist averages parameters as one vector and needs a single dtype."
        )
    with torch.no_grad():
        flat = torch.nn.utils.parameters_to_vector(params).detach().cpu()
    # parameters_to_vector concatenates into new storage, except for a module
    # with a single parameter, whose vector is a view of it.
    return flat.numpy().copy() if len(params) == 1 else flat.numpy()


def load_params(module: torch.nn.Module, vector: np.ndarray, buffers: dict | None = None) -> None:
    """Copy a flat parameter vector (and buffers) into ``module`` in place."""
    with torch.no_grad():
        # Copy into the existing storage: parameters must never alias the
        # state's arrays, which other tasks on this worker may be reading.
        copy_flat(list(module.parameters()), vector)
    load_buffers(module, buffers)


def load_buffers(module: torch.nn.Module, buffers: dict | None) -> None:
    """Copy numpy buffers (by name) into the module's buffers in place."""
    if not buffers:
        return
    own = dict(module.named_buffers())
    with torch.no_grad():
        for name, value in buffers.items():
            own[name].copy_(read_tensor(value))


def read_tensor(array) -> torch.Tensor:
    """A tensor view of a numpy array that is only read (it may be read-only)."""
    array = np.asarray(array)
    if array.flags.writeable:
        return torch.from_numpy(array)
    # Arrays received from other workers are read-only views of the message;
    # torch warns about those, although nothing here writes to them.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(array)


def _weighted_into(out: torch.Tensor, parts, weights) -> None:
    """``out = sum(w * part)``, in place: one pass per input, no temporaries."""
    out.copy_(parts[0])
    if weights[0] != 1.0:
        out.mul_(weights[0])
    for part, w in zip(parts[1:], weights[1:]):
        # (parts are host arrays; ``out`` may be on a GPU, where add_ needs them too)
        out.add_(part.to(out.device, non_blocking=True), alpha=w)


def copy_flat(tensors, vector: np.ndarray) -> None:
    """Copy consecutive slices of a flat vector into ``tensors``, in order, in place."""
    mean_flat_into(tensors, [vector], [1.0])


def mean_flat_into(tensors, vectors, weights) -> None:
    """Write ``sum(w * vector)`` over flat vectors into ``tensors``, slice by slice, in place.

    The weights are the normalised ones of a weighted mean; no temporary the
    size of the vectors is made.
    """
    flats = [read_tensor(v) for v in vectors]
    offset = 0
    for t in tensors:
        n = t.numel()
        _weighted_into(t, [f[offset:offset + n].view_as(t) for f in flats], weights)
        offset += n


def grads_finite(params) -> bool:
    """Whether every gradient of ``params`` is finite.

    Checked on the sum of each gradient, one fast reduction (NaN and inf
    entries make it non-finite; finite entries only if they sum beyond
    float32's range, about 3e38, which also counts as not finite).
    """
    sums = [p.grad.float().sum() for p in params if p.grad is not None]
    return not sums or bool(torch.isfinite(torch.stack(sums)).all())


def buffers_to_numpy(module: torch.nn.Module) -> dict:
    """Return the module's floating-point and integer buffers as numpy arrays."""
    return {name: b.detach().cpu().numpy().copy() for name, b in module.named_buffers()}


def optimizer_state_to_numpy(optimizer: torch.optim.Optimizer) -> dict:
    """Return ``optimizer.state_dict()`` with every tensor as a numpy array."""
    return _map_tree(optimizer.state_dict(), _tensor_to_numpy)


def optimizer_state_from_numpy(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load a state made by :func:`optimizer_state_to_numpy` into ``optimizer``."""
    if not state:
        return
    optimizer.load_state_dict(_map_tree(state, _numpy_to_tensor))


def module_to_state(module: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    **counters) -> TrainingState:
    """Capture a module and its optimizer as a :class:`TrainingState`."""
    return TrainingState(
        params=params_vector(module),
        buffers=buffers_to_numpy(module),
        optimizer=optimizer_state_to_numpy(optimizer),
        **counters,
    )


def _tensor_to_numpy(leaf):
    if isinstance(leaf, torch.Tensor):
        return leaf.detach().cpu().numpy().copy()
    return leaf


def _numpy_to_tensor(leaf):
    if isinstance(leaf, np.ndarray):
        return torch.from_numpy(leaf.copy())
    return leaf


def _map_tree(tree, fn):
    if isinstance(tree, dict):
        return {k: _map_tree(v, fn) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_map_tree(v, fn) for v in tree)
    return fn(tree)


def tree_nbytes(tree) -> int:
    """Total bytes of the numpy arrays (and packed updates) in a tree."""
    if isinstance(tree, dict):
        return sum(tree_nbytes(v) for v in tree.values())
    if isinstance(tree, (list, tuple)):
        return sum(tree_nbytes(v) for v in tree)
    if isinstance(tree, (np.ndarray, Packed)):
        return int(tree.nbytes)
    return 0


def _is_averaged(leaf) -> bool:
    return isinstance(leaf, np.ndarray) and np.issubdtype(leaf.dtype, np.floating)


def tree_weighted_sum(trees, weights):
    """Return ``sum(w * tree)`` over the trees, leaf by leaf.

    Trees with weight zero are ignored (they may be ``None``). Floating-point
    arrays are summed with their weights; every other leaf (integer counters,
    hyper-parameters, ``None``) is taken from the first remaining tree.
    """
    pairs = [(t, float(w)) for t, w in zip(trees, weights) if w]
    if not pairs:
        raise ValueError("tree_weighted_sum needs at least one tree with a non-zero weight.")
    trees, weights = zip(*pairs)
    return _weighted_sum(trees, weights, trees[0])


def _weighted_sum(trees, weights, first):
    if isinstance(first, dict):
        return {k: _weighted_sum([t[k] for t in trees], weights, first[k]) for k in first}
    if isinstance(first, (list, tuple)):
        return type(first)(
            _weighted_sum([t[i] for t in trees], weights, first[i]) for i in range(len(first))
        )
    if _is_averaged(first):
        total = np.empty_like(first)
        _weighted_into(torch.from_numpy(total),
                       [read_tensor(np.asarray(t, dtype=first.dtype)) for t in trees], weights)
        return total
    return first


def tree_scale(tree, factor: float):
    """Multiply every floating-point array of a tree by ``factor``."""
    if isinstance(tree, dict):
        return {k: tree_scale(v, factor) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(tree_scale(v, factor) for v in tree)
    if _is_averaged(tree):
        return tree * np.asarray(factor, dtype=tree.dtype)
    return tree


def tree_diff(after, before):
    """``after - before`` leaf by leaf, for the floating-point arrays of ``after``.

    A leaf missing from ``before`` (optimizer state that did not exist yet)
    counts as zero; other leaves are taken from ``after``.
    """
    if isinstance(after, dict):
        before = before if isinstance(before, dict) else {}
        return {k: tree_diff(v, before.get(k)) for k, v in after.items()}
    if isinstance(after, (list, tuple)):
        if not (isinstance(before, (list, tuple)) and len(before) == len(after)):
            before = [None] * len(after)
        return type(after)(tree_diff(a, b) for a, b in zip(after, before))
    if _is_averaged(after):
        out = np.array(after, copy=True)  # (in place, so that 0-d arrays stay arrays)
        if _is_averaged(before):
            out -= before
        return out
    return after


def tree_add(base, delta, scale: float = 1.0):
    """``base + scale * delta`` leaf by leaf, for the floating-point arrays of ``delta``.

    A leaf missing from ``base`` counts as zero; other leaves are taken from
    ``delta``. A packed leaf (:class:`~daskdist.compression.Packed`) is
    unpacked first.
    """
    delta = unpacked(delta)
    if isinstance(delta, dict):
        base = base if isinstance(base, dict) else {}
        return {k: tree_add(base.get(k), v, scale) for k, v in delta.items()}
    if isinstance(delta, (list, tuple)):
        if not (isinstance(base, (list, tuple)) and len(base) == len(delta)):
            base = [None] * len(delta)
        return type(delta)(tree_add(b, d, scale) for b, d in zip(base, delta))
    if _is_averaged(delta):
        out = np.array(delta, copy=True)
        out *= np.asarray(scale, dtype=out.dtype)
        if _is_averaged(base):
            out += base
        return out
    return delta
