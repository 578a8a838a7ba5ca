"""What a fit reports: each epoch's result, and the rows of ``rounds_`` and ``recoveries_``."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..state import TrainingState

__all__ = ["EpochResult", "ROUND_COLUMNS", "RECOVERY_COLUMNS", "round_rows", "membership_text"]

#: Columns of the ``rounds_`` table: one row per synchronisation round.
ROUND_COLUMNS = ("round", "epoch", "replicas", "skipped", "samples", "loss", "bytes", "sync_s",
                 "compute_s", "staleness", "dropped", "drift", "n_replicas", "membership",
                 "replica_compute_s", "activation_bytes")
#: Columns of the ``recoveries_`` table: one row per recovery from a lost worker
#: (the epoch, the round counter training went on from, finished rounds that
#: had to be run again, and what was lost).
RECOVERY_COLUMNS = ("epoch", "round", "rounds_lost", "reason")


@dataclass
class EpochResult:
    """What one epoch produced, as the client sees it."""

    epoch: int
    state: TrainingState
    train_loss: float
    samples: int
    rounds: list
    duration: float
    valid: dict = field(default_factory=dict)
    #: Relative mismatch of the replicas' copies at the epoch's end (None: not compared).
    drift: float | None = None
    #: The fit's replicas at the epoch's end.
    replicas: int = 0
    #: What changed in the replicas before the epoch and during it
    #: (``membership.follow_workers``), oldest first; each names the round it took effect.
    changes: list = field(default_factory=list)

    def __post_init__(self):
        if self.drift is not None and self.rounds:  # on the row of the epoch's last round
            self.rounds[-1]["drift"] = self.drift
        for row in self.rounds:  # the replicas of the change last before the round
            before = [c for c in self.changes if c["round"] <= row["round"]]
            later = [c for c in self.changes if c["round"] > row["round"]]
            row["n_replicas"] = (before[-1]["after"] if before
                                 else later[0]["before"] if later else self.replicas)
        for change in self.changes:  # on the row of the first round after the change
            rows = [row for row in self.rounds if row["round"] >= change["round"]]
            if rows:
                rows[0]["membership"] = "; ".join(
                    filter(None, [rows[0]["membership"], membership_text(change)]))

    @property
    def change(self) -> dict | None:
        """The latest change of the replicas in the epoch, or None."""
        return self.changes[-1] if self.changes else None

    @property
    def samples_per_sec(self) -> float:
        """Training samples per second of wall time."""
        return self.samples / self.duration if self.duration else float("nan")


def round_rows(state: TrainingState) -> list[dict]:
    """Rows of the ``rounds_`` table for the rounds logged in ``state``."""
    rows, prev_end = [], None
    for r in state.log:
        start = r["t_start"] if prev_end is None else prev_end
        span = max(r["t_end"] - start, 0.0)
        rows.append({
            "round": r["round"], "epoch": r["epoch"], "replicas": r["replicas"],
            "skipped": r.get("skipped", ()),
            "samples": r["samples"],
            "loss": r["loss_sum"] / r["samples"] if r["samples"] else float("nan"),
            "bytes": r["bytes"],
            "sync_s": r["sync_s"] if "sync_s" in r else max(span - r["compute_s"], 0.0),
            "compute_s": r["compute_s"],
            # versions applied since the update's replica started (0: all replicas met)
            "staleness": r.get("staleness", 0),
            # updates that missed this round's deadline (applied in a later round)
            "dropped": r.get("dropped", 0),
            # relative mismatch of the replicas' copies, where compared (an epoch's end)
            "drift": r.get("drift", float("nan")),
            # the replicas of the epoch, and what changed in them before its first round
            "n_replicas": r.get("n_replicas", len(r["replicas"])),
            "membership": "",
            # each replica's own compute in the round, in replica order
            "replica_compute_s": tuple(float(p[3]) for p in r.get("per_replica", ())),
            # ``pipeline``: each stage's peak bytes of saved activations in the step
            "activation_bytes": tuple(r.get("activation_bytes", ())),
        })
        prev_end = r["t_end"]
    return rows


def membership_text(change: dict) -> str:
    """A change of the replicas in a few words: ``"2→3 replicas; joined tcp://…"``."""
    text = f"{change['before']}→{change['after']} replicas"
    if change["joined"]:
        text += "; joined " + ", ".join(change["joined"])
    if change["left"]:
        text += "; left " + ", ".join(change["left"])
    return text
