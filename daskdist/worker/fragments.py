"""Fragments of the parameter vector, for streaming DiLoCo (``diloco``'s ``fragments``).

Streaming DiLoCo (Douillard et al. 2025, "Streaming DiLoCo with
overlapping communication", arXiv 2501.18512) synchronises the model in
fragments, one at a time, so that each exchange carries a share of the
parameters. Here a fragment is a run of whole parameter tensors, in
``module.parameters()`` order, cut where the running count of elements
comes nearest to an equal share; round ``r`` of an epoch exchanges fragment
``r % K``, and an epoch's last round exchanges them all, so that the epoch
ends with one global state.
"""

from __future__ import annotations

import numpy as np

__all__ = ["fragment_bounds", "exchanged_bounds"]


def fragment_bounds(sizes, k: int) -> list[tuple[int, int]]:
    """``(start, stop)`` of ``k`` fragments of a flat vector of tensors of ``sizes`` elements.

    Each fragment is a non-empty run of whole tensors; cuts fall at the
    tensor boundary nearest to an equal share of elements.
    """
    sizes = [int(s) for s in sizes]
    if not 1 <= k <= len(sizes):
        raise ValueError(f"Cannot cut {len(sizes)} parameter tensors into {k} fragments: a "
                         "fragment holds whole tensors, so fragments must be between 1 and the "
                         f"number of parameter tensors ({len(sizes)}).")
    ends = np.cumsum(sizes)
    total, cuts, previous = int(ends[-1]), [], 0
    for j in range(1, k):
        target = total * j / k
        # cut after tensor t - 1, leaving at least one tensor for each fragment still to come
        candidates = range(previous + 1, len(sizes) - (k - j) + 1)
        previous = min(candidates, key=lambda t: abs(int(ends[t - 1]) - target))
        cuts.append(int(ends[previous - 1]))
    edges = [0, *cuts, total]
    return list(zip(edges[:-1], edges[1:]))


def exchanged_bounds(spec, plan) -> tuple[int, int] | None:
    """The part of the parameter vector round ``plan`` exchanges (None: all of it).

    Fragment ``plan.round % plan.fragments``, except in an epoch's last
    round (and without fragments), which exchanges every parameter.
    """
    if plan.fragments == 1 or plan.epochs_completed() > plan.epoch:
        return None
    sizes = [p.numel() for p in spec.module.parameters()]
    return fragment_bounds(sizes, plan.fragments)[plan.round % plan.fragments]
