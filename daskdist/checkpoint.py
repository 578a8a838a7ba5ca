"""Checkpoints: tensors in safetensors, everything else in a JSON sidecar.

A checkpoint is a directory::

    checkpoint.json                       the sidecar; names the tensor file
    state-<round>-<token>.safetensors     parameters, buffers, optimizer tensors

The sidecar holds the counters (step, round, epoch, skipped updates), the
current epoch's round log (so that a fit resumes mid-epoch at the exact
round), where each replica is in its shard (``async`` and ``ssp``), the
optimizer state's non-tensor parts (hyper-parameters, parameter groups)
and whatever JSON the caller adds (the estimators store their history,
random state, strategy and JSON-representable parameters).

Writing is atomic: the tensor file is written under a temporary name, flushed
to disk and renamed, and only then is the sidecar replaced the same way; the
tensor file of the previous checkpoint is removed last. A process killed at
any point leaves the previous checkpoint (or the new one) complete and
loadable.

A fit whose pipeline stages hold their state writes a *sharded* checkpoint
instead: a file per stage and the sidecar as their index
(:mod:`daskdist.sharded_checkpoint`); :func:`load_checkpoint` reads its
counters, and the stages read their tensors.

Loading never unpickles. safetensors files are a JSON header and raw bytes;
the sidecar is JSON. A pickle or ``torch.save`` file given where a checkpoint
is expected is refused before anything in it is read as code.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file

from .state import TrainingState

__all__ = ["save_checkpoint", "load_checkpoint", "CheckpointError", "SIDECAR", "FORMAT_VERSION",
           "READABLE_VERSIONS", "json_default", "log_record", "write_sidecar"]

#: Name of the sidecar inside a checkpoint directory.
SIDECAR = "checkpoint.json"
_FORMAT = "daskdist-checkpoint"
#: The sidecar's format version this daskdist writes (``"version"``). Version 2 added
#: ``state.own``, what replicas keep of their own (a version-1 checkpoint has none);
#: version 3 ``state.outer``, the outer optimizer's state (``diloco``).
FORMAT_VERSION = 3
#: The format versions this daskdist reads: every one written since the first.
READABLE_VERSIONS = (1, 2, 3)
_PICKLE_MAGIC = (b"\x80",)  # protocol 2 and later
_ZIP_MAGIC = b"PK\x03\x04"  # torch.save's zip container (pickle inside)


class CheckpointError(ValueError):
    """A checkpoint is missing, damaged, or not a daskdist checkpoint."""


def save_checkpoint(path, state: TrainingState, meta: dict | None = None) -> Path:
    """Write ``state`` (and JSON ``meta``) as a checkpoint directory, atomically.

    Parameters
    ----------
    path : str or os.PathLike
        The checkpoint directory (created if missing). A checkpoint already
        there is replaced only once the new one is complete.
    state : TrainingState
        Parameters, buffers, optimizer state and counters.
    meta : dict, optional
        JSON-representable extras stored in the sidecar (numpy scalars and
        arrays are converted to numbers and lists).

    Returns
    -------
    pathlib.Path
        The checkpoint directory.
    """
    directory = Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {"params": _contiguous(state.params)}
    buffers = _to_json(dict(state.buffers), "buffers", tensors)
    optimizer = _to_json(state.optimizer, "optimizer", tensors)
    own = _to_json(dict(state.own), "own", tensors)
    outer = _to_json(dict(state.outer), "outer", tensors)
    name = f"state-{state.round:09d}-{uuid.uuid4().hex[:8]}.safetensors"
    tmp = directory / f".{name}.tmp"
    save_file(tensors, str(tmp), metadata={"format": _FORMAT})
    digest = _sha256(tmp)
    _fsync_file(tmp)
    os.replace(tmp, directory / name)
    _fsync_dir(directory)

    sidecar = {
        "format": _FORMAT,
        "version": FORMAT_VERSION,
        "tensors": name,
        "sha256": digest,
        "state": {"step": int(state.step), "round": int(state.round),
                  "epoch": int(state.epoch), "skipped": int(state.skipped),
                  "buffers": buffers, "optimizer": optimizer, "own": own,
                  "outer": outer,
                  "log": [dict(r) for r in state.log],
                  "cursors": [list(map(int, c)) for c in state.cursors]},
        "meta": meta or {},
    }
    write_sidecar(directory, sidecar)

    for old in directory.glob("state-*.safetensors"):  # the previous checkpoint's tensors
        if old.name != name:
            old.unlink(missing_ok=True)
    return directory


def write_sidecar(directory: Path, sidecar: dict) -> None:
    """Replace ``directory``'s sidecar with ``sidecar``, atomically (written, fsynced, renamed)."""
    text = json.dumps(sidecar, indent=1, default=json_default)
    tmp = directory / f".{SIDECAR}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, directory / SIDECAR)
    _fsync_dir(directory)


def load_checkpoint(path) -> tuple[TrainingState, dict]:
    """Read a checkpoint written by :func:`save_checkpoint`; never unpickles.

    Parameters
    ----------
    path : str or os.PathLike
        The checkpoint directory, or its ``checkpoint.json``.

    Returns
    -------
    state : TrainingState
        For a sharded checkpoint (:mod:`daskdist.sharded_checkpoint`), the
        counters only: its tensors stay in the stage files, and
        ``meta["shards"]`` says where.
    meta : dict
        The extras stored with it.

    Raises
    ------
    CheckpointError
        If ``path`` is not a complete daskdist checkpoint — in particular if
        it is a pickle or ``torch.save`` file, which is refused unread.
    """
    path = Path(path)
    if path.is_file() and path.name != SIDECAR:
        _refuse_foreign_file(path)
    directory = path.parent if path.is_file() else path
    sidecar_path = directory / SIDECAR
    if not sidecar_path.is_file():
        raise CheckpointError(f"{directory} is not a daskdist checkpoint: it has no {SIDECAR}.")
    _refuse_pickle(sidecar_path)
    try:
        sidecar = json.loads(sidecar_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{sidecar_path} is not valid JSON ({err}).") from None
    if not isinstance(sidecar, dict) or sidecar.get("format") != _FORMAT:
        raise CheckpointError(f"{sidecar_path} is not a daskdist checkpoint sidecar.")
    if sidecar.get("version") not in READABLE_VERSIONS:
        raise CheckpointError(
            f"{sidecar_path} has checkpoint format version {sidecar.get('version')!r}; this "
            f"daskdist reads versions {list(READABLE_VERSIONS)}."
        )
    if sidecar.get("layout") == "sharded":  # one file per pipeline stage, read by the stages
        return _read_sharded(directory, sidecar)
    name = sidecar.get("tensors")
    if not isinstance(name, str) or Path(name).name != name:
        raise CheckpointError(f"{sidecar_path} names an invalid tensor file {name!r}.")
    tensor_path = directory / name
    if not tensor_path.is_file():
        raise CheckpointError(f"{sidecar_path} refers to {name}, which is missing.")
    _refuse_pickle(tensor_path)
    if _sha256(tensor_path) != sidecar.get("sha256"):
        raise CheckpointError(f"{tensor_path} does not match the checksum in {sidecar_path}.")
    tensors = load_file(str(tensor_path))
    saved = sidecar["state"]
    state = TrainingState(
        params=tensors["params"],
        buffers=_from_json(saved["buffers"], tensors),
        optimizer=_from_json(saved["optimizer"], tensors),
        step=saved["step"], round=saved["round"], epoch=saved["epoch"],
        skipped=saved.get("skipped", 0), log=tuple(log_record(r) for r in saved.get("log", ())),
        cursors=tuple(tuple(c) for c in saved.get("cursors", ())),
        own=_from_json(saved["own"], tensors) if "own" in saved else {},
        outer=_from_json(saved["outer"], tensors) if "outer" in saved else {},
    )
    return state, sidecar.get("meta", {})


def _read_sharded(directory: Path, index: dict) -> tuple[TrainingState, dict]:
    """The counters of a sharded checkpoint as a state without tensors, and its ``meta``.

    ``meta["shards"]`` carries what the stages read on resume: the
    directory, the files with their tensors and checksums, and the
    optimizer groups' options.
    """
    saved = index["state"]
    state = TrainingState(
        params=np.zeros(0, np.float32), buffers={}, optimizer={}, step=saved["step"],
        round=saved["round"], epoch=saved["epoch"], skipped=saved.get("skipped", 0),
        log=tuple(log_record(r) for r in saved.get("log", ())),
        cursors=tuple(tuple(c) for c in saved.get("cursors", ())))
    meta = dict(index.get("meta", {}))
    meta["shards"] = {"directory": str(directory.resolve()), "shards": index["shards"],
                      "groups": index["optimizer"]["groups"], "model": index["model"],
                      "round": int(saved["round"])}
    return state, meta


def log_record(record: dict) -> dict:
    """A round-log record read from JSON (its replica lists back to tuples)."""
    return {k: tuple(v) if isinstance(v, list) else v for k, v in record.items()}


# -- trees of arrays <-> JSON skeleton + flat tensor dict --------------------------------------
def _to_json(tree, key: str, tensors: dict):
    if isinstance(tree, np.ndarray):
        tensors[key] = _contiguous(tree)
        return {"__tensor__": key}
    if isinstance(tree, dict):  # keys may be ints (optimizer state): keep their types
        return {"__dict__": [[k, _to_json(v, f"{key}/{k}", tensors)] for k, v in tree.items()]}
    if isinstance(tree, tuple):
        return {"__tuple__": [_to_json(v, f"{key}/{i}", tensors) for i, v in enumerate(tree)]}
    if isinstance(tree, list):
        return [_to_json(v, f"{key}/{i}", tensors) for i, v in enumerate(tree)]
    if isinstance(tree, np.generic):
        return tree.item()
    if tree is None or isinstance(tree, (bool, int, float, str)):
        return tree
    raise TypeError(
        f"Cannot store {key} of type {type(tree).__name__} in a checkpoint without pickle."
    )


def _contiguous(array: np.ndarray) -> np.ndarray:
    # (np.ascontiguousarray would turn 0-d arrays, such as step counters, into 1-d ones)
    return array if array.flags.c_contiguous else array.copy(order="C")


def _from_json(node, tensors: dict):
    if isinstance(node, dict):
        if "__tensor__" in node:
            return tensors[node["__tensor__"]]
        if "__tuple__" in node:
            return tuple(_from_json(v, tensors) for v in node["__tuple__"])
        if "__dict__" in node:
            return {k: _from_json(v, tensors) for k, v in node["__dict__"]}
    if isinstance(node, list):
        return [_from_json(v, tensors) for v in node]
    return node


def json_default(value):
    """JSON for numpy scalars and arrays (``json.dumps(..., default=json_default)``)."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON-representable")


# -- files -------------------------------------------------------------------------------------
def _refuse_pickle(path: Path) -> None:
    with open(path, "rb") as f:
        head = f.read(4)
    if head.startswith(_PICKLE_MAGIC) or head == _ZIP_MAGIC:
        raise CheckpointError(
            f"{path} is a pickle or torch.save file; daskdist never unpickles files (that would "
            "run code from the file). Save checkpoints with daskdist (safetensors + JSON)."
        )


def _refuse_foreign_file(path: Path) -> None:
    _refuse_pickle(path)
    raise CheckpointError(
        f"{path} is not a daskdist checkpoint: give the checkpoint directory (the one that "
        f"holds {SIDECAR})."
    )


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # platforms without directory handles
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
