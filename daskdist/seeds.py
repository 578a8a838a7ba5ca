"""Seeds derived from a fit's ``random_state``: every round is a pure function of its inputs."""

from __future__ import annotations

import numpy as np

__all__ = ["seed_for"]


def seed_for(random_state: int, *parts: int) -> int:
    """A 32-bit seed derived from ``random_state`` and integer coordinates.

    Used for per-epoch shuffles and per-round torch seeds, so that every round
    is a pure function of its inputs.
    """
    entropy = [int(random_state), *map(int, parts)]
    return int(np.random.SeedSequence(entropy).generate_state(1)[0])
