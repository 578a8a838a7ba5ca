"""Reliable Ctrl-C during a fit.

Python raises ``KeyboardInterrupt`` wherever the main thread happens to be
when SIGINT arrives. If that is inside a finalizer — and a driver drops Dask
futures all the time, whose ``__del__`` releases them — the exception is
printed as "ignored" and lost, and the fit runs on. While :func:`guard` is
active, SIGINT also sets a flag that the driver checks at safe points
(:func:`raise_if_interrupted`), so an interrupt swallowed that way is raised
again a moment later.
"""

from __future__ import annotations

import contextlib
import signal
import threading

__all__ = ["guard", "raise_if_interrupted", "clear"]

_pending = False


def _handler(signum, frame):
    global _pending
    _pending = True
    raise KeyboardInterrupt


@contextlib.contextmanager
def guard():
    """Install the flagging SIGINT handler for the duration of a fit.

    Does nothing outside the main thread, or when SIGINT has a handler other
    than Python's default (the application's handler stays in charge).
    """
    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGINT) is not signal.default_int_handler):
        yield
        return
    previous = signal.signal(signal.SIGINT, _handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        clear()


def raise_if_interrupted() -> None:
    """Raise ``KeyboardInterrupt`` if SIGINT arrived and was not raised where it landed."""
    if _pending:
        clear()
        raise KeyboardInterrupt


def clear() -> None:
    """Forget a pending interrupt (it is being handled)."""
    global _pending
    _pending = False
