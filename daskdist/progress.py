"""The client's progress bar during ``fit``: rounds and epochs, with the current loss.

The bar follows the ``"round"`` events the workers send to the scheduler
(:mod:`daskdist.dashboard.events`), so it moves as rounds finish on the
cluster, not only when an epoch's result reaches the client. It is a
``tqdm.auto`` bar: text on a terminal (on stderr), a widget in a notebook.
"""

from __future__ import annotations

import sys
import threading

from .dashboard.events import TOPIC

__all__ = ["RoundProgress"]


class RoundProgress:
    """A progress bar over the rounds of one fit.

    Parameters
    ----------
    client : distributed.Client
        The fit's client (the bar subscribes to its scheduler's events).
    run_id : str
        The fit's run id (events of other runs are ignored).
    total_rounds : int
        Rounds the fit will run.
    rounds_per_epoch : int
        Rounds in an epoch.
    first_round : int
        Round counter the fit starts from (a continued or resumed fit).
    file : file-like, optional
        Where a text bar goes; default ``sys.stderr``.
    """

    def __init__(self, client, run_id: str, total_rounds: int, rounds_per_epoch: int, *,
                 first_round: int = 0, file=None):
        from tqdm.auto import tqdm

        self.client, self.run_id = client, run_id
        self.first_round, self.rounds_per_epoch = first_round, max(rounds_per_epoch, 1)
        self._newest = first_round - 1
        self._lock = threading.Lock()
        self.bar = tqdm(total=total_rounds, unit="round", file=file or sys.stderr,
                        dynamic_ncols=True, leave=False, desc="daskdist")
        client.subscribe_topic(TOPIC, self._on_event)

    def _on_event(self, event) -> None:
        _, msg = event
        if not isinstance(msg, dict) or msg.get("run") != self.run_id \
                or msg.get("kind") != "round":
            return
        with self._lock:
            # rounds up to the newest one reported: some strategies report only every
            # few rounds (ddp, whose rounds run inside one task per worker)
            self._newest = max(self._newest, msg["round"])
            done = min(self._newest - self.first_round + 1, self.bar.total)
            epoch = (msg["round"] - self.first_round) // self.rounds_per_epoch + 1
            shown = {"epoch": epoch}
            if msg.get("loss") is not None:
                shown["loss"] = f"{msg['loss']:.4f}"
            self.bar.set_postfix(shown, refresh=False)
            self.bar.update(done - self.bar.n)

    def close(self) -> None:
        """Stop listening and remove the bar."""
        try:
            self.client.unsubscribe_topic(TOPIC)
        except Exception:  # the client may already be closing
            pass
        with self._lock:
            self.bar.close()
