"""Torch's one-time start-up cost, paid in the background while a cluster starts.

The first ``torch.optim`` optimizer a process builds imports
``torch._dynamo`` (``Optimizer.__init__`` is wrapped to keep the compiler
out, and that wrapper imports the compiler's front end on its first call):
1–2 s on our 2-core build machines, whether or not anything is ever
compiled. A fit builds optimizers in the client (skorch's ``initialize``)
and in every worker (each replica's first round), so in fresh processes
that import was most of a fit's fixed cost and of its first epoch's extra
time. :func:`warm_up` pays it on a background thread instead: the embedded
cluster starts it in the client as its workers spawn, and in each worker
at start-up (this module is a Dask preload: :func:`dask_setup`).
"""

from __future__ import annotations

import threading

__all__ = ["warm_up", "is_warm", "dask_setup"]

_lock = threading.Lock()
_thread: threading.Thread | None = None


def _build_an_optimizer() -> None:
    import torch

    torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)  # imports torch._dynamo


def is_warm() -> bool:
    """Whether this process's warm-up is over (or was never started)."""
    return _thread is None or not _thread.is_alive()


def warm_up() -> threading.Thread:
    """Start building a throw-away optimizer on a daemon thread (once per process).

    Returns the thread; a caller that builds an optimizer meanwhile waits
    for the import it started (Python's import lock), never repeats it.
    """
    global _thread
    with _lock:
        if _thread is None:
            _thread = threading.Thread(target=_build_an_optimizer, name="daskdist-warm-up",
                                       daemon=True)
            _thread.start()
        return _thread


def dask_setup(worker) -> None:
    """Dask preload hook: warm torch up as the worker starts."""
    warm_up()
