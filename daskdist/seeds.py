"""Seeds derived from a fit's ``random_state``: every round is a pure function of its inputs."""

from __future__ import annotations

import contextlib
import threading

import numpy as np
import torch

__all__ = ["seed_for", "seeded_torch", "torch_rng_kept"]

# torch has one global generator per process: fits built in several threads at once (a
# search with a threading backend, fits started side by side) take turns with it
_torch_rng = threading.RLock()


def seed_for(random_state: int, *parts: int) -> int:
    """A 32-bit seed derived from ``random_state`` and integer coordinates.

    Used for per-epoch shuffles and per-round torch seeds, so that every round
    is a pure function of its inputs.
    """
    entropy = [int(random_state), *map(int, parts)]
    return int(np.random.SeedSequence(entropy).generate_state(1)[0])


@contextlib.contextmanager
def seeded_torch(seed: int | None):
    """Run the block with torch's CPU generator seeded by ``seed``, restored afterwards.

    Other threads of this process that enter this block or :func:`torch_rng_kept`
    wait for it, so a module built inside it (its initial weights) depends on
    ``seed`` only, even when several fits start at once. ``None``: no seeding,
    the generator draws on from where it is (still one thread at a time, so
    that an unseeded fit never draws from a seeded fit's stream).
    """
    with _torch_rng:
        if seed is None:
            yield
            return
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            yield


@contextlib.contextmanager
def torch_rng_kept():
    """Run the block one thread at a time, torch's CPU generator restored afterwards.

    For work on the client that must leave no trace on the generator (a dry
    forward pass): restoring the generator while another thread draws from it
    would replay that thread's draws.
    """
    with _torch_rng, torch.random.fork_rng(devices=[]):
        yield
