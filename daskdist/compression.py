"""Compressing what replicas send for synchronisation: half precision and top-k.

A strategy with ``compression`` set packs each replica's update — the
gradient (``sync``) or the change of the parameters over the round
(``local_sgd``, ``hierarchical``) — before it leaves the worker, and the
aggregation unpacks it before averaging:

- ``"fp16"``: IEEE half precision (2 bytes a value instead of 4);
- ``"bf16"``: bfloat16, float32's range with 8 bits of mantissa (2 bytes);
- ``"topk"``: the ``density`` share of entries largest in magnitude, as
  int32 indices and float32 values (8 bytes per kept entry), with error
  feedback: what a replica did not send is added to its next update (Stich et
  al. 2018, "Sparsified SGD with Memory"; Lin et al. 2018, "Deep Gradient
  Compression"), so every part of the update is applied eventually.

Buffers (batch-norm statistics) and optimizer state travel uncompressed. The
error-feedback memory is part of what the replica keeps of its own
(:mod:`daskdist.worker.own_state`): kept on its worker by round, carried by
an epoch's final state into checkpoints, restored after a lost worker.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["COMPRESSIONS", "Packed", "check_compression", "decompress", "pack", "unpacked"]

#: Accepted values of ``compression`` (``None``: send float32 as it is).
COMPRESSIONS = (None, "fp16", "bf16", "topk")


def check_compression(compression, density) -> None:
    """Raise ``ValueError`` for a compression or density that is not allowed."""
    if compression not in COMPRESSIONS:
        raise ValueError(f"compression must be one of {COMPRESSIONS}, got {compression!r}.")
    if isinstance(density, bool) or not isinstance(density, (int, float)) \
            or not 0.0 < density <= 1.0:
        raise ValueError(f"density must be a number in (0, 1], got {density!r}.")


@dataclass
class Packed:
    """A compressed float32 vector.

    ``data`` is a float16 array (``fp16``), a uint16 array of bfloat16 bits
    (``bf16``), or ``(indices, values)`` (``topk``); ``size`` is the length
    of the vector it stands for.
    """

    kind: str
    size: int
    data: object

    @property
    def nbytes(self) -> int:
        """Bytes of the packed data (what travels)."""
        if self.kind == "topk":
            return int(self.data[0].nbytes + self.data[1].nbytes)
        return int(self.data.nbytes)

    def __sizeof__(self) -> int:
        return object.__sizeof__(self) + self.nbytes


def pack(vector: np.ndarray, kind: str, *, density: float = 0.01,
         residual: np.ndarray | None = None) -> tuple[Packed, np.ndarray | None]:
    """Compress a float32 vector.

    Parameters
    ----------
    vector : numpy.ndarray
        The update, 1-d float32.
    kind : {"fp16", "bf16", "topk"}
    density : float
        Share of entries ``topk`` keeps (at least one).
    residual : numpy.ndarray, optional
        ``topk``'s error-feedback memory, added to ``vector`` first.

    Returns
    -------
    packed : Packed
    residual : numpy.ndarray or None
        What was not sent (``topk``), to pass to the next call.
    """
    vector = np.ascontiguousarray(vector, dtype=np.float32)
    if kind == "fp16":
        return Packed(kind, vector.size, vector.astype(np.float16)), None
    if kind == "bf16":
        bits = torch.from_numpy(vector).to(torch.bfloat16).view(torch.int16).numpy()
        return Packed(kind, vector.size, bits.view(np.uint16).copy()), None
    if kind != "topk":
        raise ValueError(f"Unknown compression {kind!r}.")
    if residual is not None:
        vector = vector + residual
    k = max(1, int(round(density * vector.size)))
    if k >= vector.size:
        indices = np.arange(vector.size, dtype=np.int32)
    else:
        indices = np.argpartition(np.abs(vector), vector.size - k)[-k:].astype(np.int32)
        indices.sort()
    values = vector[indices].astype(np.float32)
    left = vector.copy()
    left[indices] = 0.0
    return Packed(kind, vector.size, (indices, values)), left


def decompress(packed: Packed) -> np.ndarray:
    """The float32 vector a :class:`Packed` stands for (zeros where ``topk`` sent nothing)."""
    if packed.kind == "fp16":
        return packed.data.astype(np.float32)
    if packed.kind == "bf16":
        bits = torch.from_numpy(packed.data.view(np.int16).copy())
        return bits.view(torch.bfloat16).float().numpy()
    indices, values = packed.data
    out = np.zeros(packed.size, dtype=np.float32)
    out[indices] = values
    return out


def unpacked(update):
    """``update`` as a float32 array, unpacking it if it is :class:`Packed`."""
    return decompress(update) if isinstance(update, Packed) else update
