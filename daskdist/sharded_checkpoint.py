"""Sharded checkpoints: one safetensors file per pipeline stage, and a JSON index.

A fit whose stages hold their state (``strategy__build="workers"``) never has
the whole model in one place, so its checkpoint cannot be one file. It is a
directory::

    checkpoint.json                            the index (and the sidecar's usual contents)
    stage-<s>-<round>-<token>.safetensors      one stage's tensors, written by its worker

The directory must be on a file system that the stages' workers and the
client share. Writing is atomic as a set: every stage writes its file under
a new name (:func:`daskdist.worker.stage_files.write_stage`), and only when
all are on disk does the client replace the index, the same way
:mod:`daskdist.checkpoint` replaces its sidecar; the files of the previous
set are removed last. A save that fails part way leaves the previous
checkpoint complete.

``fit(X, y, resume=path)`` restores each stage on its worker from the
files, by tensor name, so the resumed fit may cut the model into another
number of stages. :func:`merge_checkpoint` writes a sharded checkpoint as a
whole one (:mod:`daskdist.checkpoint`), for a machine with the memory of the
whole model (``daskdist checkpoint merge SRC DST``).
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import numpy as np

from .checkpoint import (
    FORMAT_VERSION,
    SIDECAR,
    CheckpointError,
    save_checkpoint,
    write_sidecar,
)
from .state import TrainingState

__all__ = ["save_sharded", "merge_checkpoint"]

_FORMAT = "daskdist-checkpoint"


def _counters(state: TrainingState) -> dict:
    return {"step": int(state.step), "round": int(state.round), "epoch": int(state.epoch),
            "skipped": int(state.skipped), "log": [dict(r) for r in state.log],
            "cursors": [list(map(int, c)) for c in state.cursors]}


def save_sharded(client, path, placement, module, optimizer, state: TrainingState,
                 meta: dict) -> Path:
    """Write a sharded checkpoint of the stages ``placement`` names, atomically as a set.

    Parameters
    ----------
    client : distributed.Client
    path : str or os.PathLike
        The checkpoint directory (created if missing).
    placement : daskdist.staged.StagePlacement
        Where the stages live; the first pipeline's stages are saved.
    module, optimizer
        The estimator's ``module_`` (on ``meta``) and ``optimizer_``: the
        whole model's parameter order and optimizer groups, for the index.
    state : TrainingState
        The counters and round log (its tensors live in the stages).
    meta : dict
        JSON extras (history, random state, parameters).
    """
    from .worker.stage_files import write_stage

    directory = Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    token = uuid.uuid4().hex[:8]
    shards = client.gather([
        client.submit(write_stage, str(directory.resolve()),
                      f"stage-{s:03d}-{state.round:09d}-{token}.safetensors",
                      run_id=placement.run_id, replica=0, stage=s, round=state.round,
                      workers=[worker], allow_other_workers=False, pure=False,
                      key=f"daskdist-stage-save-{token}-{s}")
        for s, worker in enumerate(placement.workers)])
    names = {id(p): n for n, p in module.named_parameters()}
    index = {
        "format": _FORMAT, "version": FORMAT_VERSION, "layout": "sharded",
        "shards": [{k: v for k, v in shard.items() if k != "groups"} for shard in shards],
        "model": {"params": [[n, list(p.shape)] for n, p in module.named_parameters()],
                  "buffers": [[n, list(b.shape)] for n, b in module.named_buffers()]},
        "optimizer": {"groups": shards[0]["groups"],
                      "params": [[names[id(p)] for p in g["params"]]
                                 for g in optimizer.param_groups]},
        "state": _counters(state),
        "meta": meta or {},
    }
    write_sidecar(directory, index)
    kept = {shard["file"] for shard in shards}
    for old in [*directory.glob("stage-*.safetensors"), *directory.glob("state-*.safetensors"),
                *directory.glob(".stage-*.tmp")]:
        if old.name not in kept:
            old.unlink(missing_ok=True)
    return directory


def merge_checkpoint(path, out) -> Path:
    """Write the sharded checkpoint at ``path`` as one whole checkpoint at ``out``.

    The result is an ordinary checkpoint (:mod:`daskdist.checkpoint`): a fit
    with the default ``strategy__build="client"``, or any strategy, resumes
    from it. Needs the memory of the whole model and its optimizer state.
    """
    from safetensors import safe_open

    from .checkpoint import log_record
    from .worker.stage_files import file_sha256

    directory = Path(path)
    try:
        index = json.loads((directory / SIDECAR).read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{directory} holds no readable {SIDECAR} ({err}).") from None
    if index.get("layout") != "sharded":
        raise CheckpointError(f"{directory} is not a sharded checkpoint; it is whole already.")
    tensors = {}
    for shard in index["shards"]:
        file = directory / shard["file"]
        if not file.is_file() or file_sha256(file) != shard["sha256"]:
            raise CheckpointError(f"{file} is missing or does not match the index's checksum.")
        with safe_open(str(file), framework="np") as f:
            tensors.update((key, f.get_tensor(key)) for key in f.keys())
    try:
        params = np.concatenate([tensors[f"param/{n}"].ravel()
                                 for n, _ in index["model"]["params"]])
        buffers = {n: tensors[f"buffer/{n}"] for n, _ in index["model"]["buffers"]}
    except KeyError as err:
        raise CheckpointError(f"{directory}'s stage files lack {err}.") from None
    order = [n for group in index["optimizer"]["params"] for n in group]
    state_entries = {}
    for i, name in enumerate(order):
        prefix = f"optim/{name}/"
        entry = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        if entry:
            state_entries[i] = entry
    groups, start = [], 0
    for options, names in zip(index["optimizer"]["groups"], index["optimizer"]["params"]):
        groups.append({**options, "params": list(range(start, start + len(names)))})
        start += len(names)
    saved = index["state"]
    state = TrainingState(
        params=params.astype(np.float32, copy=False), buffers=buffers,
        optimizer={"state": state_entries, "param_groups": groups},
        step=saved["step"], round=saved["round"], epoch=saved["epoch"],
        skipped=saved.get("skipped", 0),
        log=tuple(log_record(r) for r in saved.get("log", ())),
        cursors=tuple(tuple(c) for c in saved.get("cursors", ())))
    return save_checkpoint(out, state, index.get("meta", {}))
