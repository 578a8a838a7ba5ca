"""A pipeline stage's tensors in a file of its own: written and read on the stage's worker.

Part of the sharded checkpoints of fits whose stages hold their state
(``strategy__build="workers"``, :mod:`daskdist.sharded_checkpoint`). Each
stage's worker writes its parameters, buffers and optimizer state to one
safetensors file in the checkpoint directory (a file system the workers and
the client share) and reads back, on resume, the tensors its stage needs,
by name, from whichever files hold them: so a fit may resume with another
number of stages than it saved with.

Tensors are named ``param/<name>``, ``buffer/<name>`` and
``optim/<name>/<key>`` (``<name>`` as in the whole model, ``<key>`` an
optimizer state entry, ``momentum_buffer`` say).

The files are safetensors (a JSON header, then each tensor's bytes), written
from the tensors' own memory and read straight into the stage's tensors
(:func:`write_safetensors`, :func:`read_into`): a stage of several GiB never
needs a second copy of itself in memory to be saved or restored.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path

import numpy as np
import torch

from ..checkpoint import CheckpointError
from .stage_cache import LiveStage, find

__all__ = ["write_stage", "restore_stage", "file_sha256", "write_safetensors", "read_into"]

_FORMAT = "daskdist-stage"
_DTYPES = {"float64": "F64", "float32": "F32", "float16": "F16", "int64": "I64",
           "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL"}
_NUMPY = {code: np.dtype(name) for name, code in _DTYPES.items()}


def write_safetensors(path: Path, tensors: dict, metadata: dict) -> None:
    """Write ``tensors`` (name -> contiguous numpy array) as a safetensors file, flushed.

    Each array's bytes go to the file from the array's own memory.
    """
    header, offset = {"__metadata__": metadata}, 0
    for name, array in tensors.items():
        header[name] = {"dtype": _DTYPES[array.dtype.name], "shape": list(array.shape),
                        "data_offsets": [offset, offset + array.nbytes]}
        offset += array.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for array in tensors.values():
            f.write(memoryview(array.reshape(-1)).cast("B"))
        f.flush()
        os.fsync(f.fileno())


def _header(f) -> tuple[dict, int]:
    (size,) = struct.unpack("<Q", f.read(8))
    return json.loads(f.read(size)), 8 + size


def read_into(path: Path, targets: dict) -> dict:
    """Read the tensors named in ``targets`` from a safetensors file into those tensors.

    ``targets`` maps a name to a CPU tensor of the stored shape and dtype,
    filled in place, or to None: a new array is read for it. Returns the
    arrays read for the None entries.
    """
    read = {}
    with open(path, "rb") as f:
        header, start = _header(f)
        for name, target in targets.items():
            entry = header.get(name)
            if entry is None:
                raise CheckpointError(f"{path} holds no tensor {name!r}.")
            begin, end = entry["data_offsets"]
            dtype, shape = _NUMPY[entry["dtype"]], tuple(entry["shape"])
            if target is None:
                array = np.empty(shape, dtype)
                read[name] = array
            else:
                if tuple(target.shape) != shape or target.numpy().dtype != dtype:
                    raise CheckpointError(
                        f"{name} is {entry['dtype']} {list(shape)} in {path}, but the model's is "
                        f"{target.numpy().dtype} {list(target.shape)}: another model saved it.")
                array = target.numpy()
            f.seek(start + begin)
            if f.readinto(memoryview(array.reshape(-1)).cast("B")) != end - begin:
                raise CheckpointError(f"{path} ends inside tensor {name!r}.")
    return read


def file_sha256(path: Path) -> str:
    """The SHA-256 of a file, read in 16 MiB pieces."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while piece := f.read(1 << 24):
            digest.update(piece)
    return digest.hexdigest()


def _stage_tensors(stage: LiveStage) -> dict:
    names = {id(p): n for n, p in stage.module.named_parameters()}
    tensors = {f"param/{n}": p.detach().cpu().numpy() for n, p in stage.module.named_parameters()}
    tensors.update((f"buffer/{n}", b.detach().cpu().numpy())
                   for n, b in stage.module.named_buffers())
    for p, entry in stage.optimizer.state.items():
        for key, value in entry.items():
            value = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else value
            tensors[f"optim/{names[id(p)]}/{key}"] = np.asarray(value)
    return {k: np.ascontiguousarray(v) for k, v in tensors.items()}


def write_stage(directory: str, name: str, *, run_id: str, replica: int, stage: int,
                round: int) -> dict:
    """Write stage ``stage``'s tensors to ``directory/name``; describe the file.

    The ``daskdist-stage-save`` task. The file is written under a temporary
    name, flushed to disk and renamed: a reader never sees half of it.
    Returns ``{"file", "sha256", "tensors", "groups"}``: the file's name and
    checksum, the tensor names in it, and the stage's optimizer groups'
    options (learning rate, momentum...).
    """
    live = find(run_id, replica, stage)
    with live.lock:
        if live.round != round:
            raise CheckpointError(f"Stage {stage} is at round {live.round}, not {round}: the "
                                  "checkpoint would mix rounds.")
        tensors = _stage_tensors(live)
        groups = [{k: v for k, v in g.items() if k != "params"}
                  for g in live.optimizer.param_groups]
        folder = Path(directory)
        tmp = folder / f".{name}.tmp"
        write_safetensors(tmp, tensors, {"format": _FORMAT, "stage": str(stage)})
        digest = file_sha256(tmp)
        os.replace(tmp, folder / name)
    return {"file": name, "sha256": digest, "tensors": sorted(tensors), "groups": groups}


def restore_stage(live: LiveStage, source: dict) -> None:
    """Load a stage's tensors from a sharded checkpoint (``source``: its index, as read).

    Reads only the tensors the stage needs, each from the file the index
    names, after checking that file's checksum. Raises
    :class:`~daskdist.checkpoint.CheckpointError` for a missing file or
    tensor, or a file that does not match its checksum.
    """
    module, optimizer = live.module, live.optimizer
    where = {key: shard["file"] for shard in source["shards"] for key in shard["tensors"]}
    sums = {shard["file"]: shard["sha256"] for shard in source["shards"]}
    wanted = {f"param/{n}": p for n, p in module.named_parameters()}
    wanted.update((f"buffer/{n}", b) for n, b in module.named_buffers())
    optim = [key for key in where
             if key.startswith("optim/") and f"param/{key[6:].rsplit('/', 1)[0]}" in wanted]
    missing = sorted(k for k in wanted if k not in where)
    if missing:
        raise CheckpointError(f"The checkpoint in {source['directory']} has no {missing[:5]}: it "
                              "was saved from another model.")
    by_file: dict = {}
    for key in [*wanted, *optim]:
        by_file.setdefault(where[key], []).append(key)
    params = dict(module.named_parameters())
    with torch.no_grad():
        for file, keys in by_file.items():
            path = Path(source["directory"]) / file
            if not path.is_file():
                raise CheckpointError(f"{path}, named in the checkpoint's index, is missing.")
            if file_sha256(path) != sums[file]:
                raise CheckpointError(f"{path} does not match the checksum in the index.")
            on_cpu = {k: wanted[k] for k in keys if k in wanted and wanted[k].device.type == "cpu"}
            read = read_into(path, {k: (on_cpu[k].data if k in on_cpu else None) for k in keys})
            for key, value in read.items():
                value = torch.from_numpy(value)
                if key in wanted:  # a tensor on a GPU: through the CPU
                    wanted[key].copy_(value)
                else:
                    name, entry = key[6:].rsplit("/", 1)
                    optimizer.state[params[name]][entry] = value.to(params[name].device)
    for group, options in zip(optimizer.param_groups, source["groups"]):
        group.update({k: v for k, v in options.items() if k != "params"})
