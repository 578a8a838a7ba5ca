"""Which skorch parameters act on the workers, checked before any work is submitted.

Replicas run a lean torch loop rather than skorch's per-batch machinery, so
some skorch features cannot act on the workers; :class:`WorkerSupport` (mixed
into :class:`~daskdist.net.DaskNet`) refuses them with a clear error before
anything reaches the cluster. See docs/skorch.md.
"""

from __future__ import annotations

from skorch.dataset import Dataset, ValidSplit
from torch.utils.data import DataLoader

from .data.dataset_shards import LOADER_OPTIONS
from .data.sources import check_streaming
from .step_callbacks import EPOCH_CALLBACKS, step_problems
from .worker.devices import check_precision

__all__ = ["WorkerSupport", "EPOCH_CALLBACKS", "PER_BATCH_METHODS", "WORKER_ITERATOR_OPTIONS"]

#: skorch methods that run per batch; overriding them cannot act on workers.
PER_BATCH_METHODS = ("train_step", "train_step_single", "get_loss", "infer",
                     "validation_step", "evaluation_step")
#: ``iterator_train__*`` options the replicas honour.
WORKER_ITERATOR_OPTIONS = ("shuffle",)


class WorkerSupport:
    """The checks of a :class:`~daskdist.net.DaskNet` that its skorch parameters can train."""

    def _holdout(self):
        """``(fraction, stratified)`` of the per-shard hold-out, or ``(None, False)``."""
        split = self.train_split
        if split is None:
            return None, False
        if not isinstance(split, ValidSplit):
            raise ValueError(
                f"train_split={split!r} cannot run on the workers; use skorch's ValidSplit "
                "(a hold-out inside each shard) or None."
            )
        cv = split.cv
        fraction = float(cv) if isinstance(cv, float) else 1.0 / int(cv)
        return fraction, bool(split.stratified)

    def check_worker_support(self, reads_dataset: bool = False) -> None:
        """Raise ``ValueError`` for skorch features that cannot act on the workers.

        See the table of skorch parameters in docs/skorch.md. Called before any work is
        submitted.

        Parameters
        ----------
        reads_dataset : bool
            The fit reads a ``Dataset`` on the workers, through a DataLoader that
            takes the ``iterator_train__*`` options of :data:`LOADER_OPTIONS`.
        """
        check_precision(self.precision)
        problems = []
        if self.dataset is not Dataset:
            problems.append("a custom dataset (replicas index arrays directly)")
        if self.iterator_train is not DataLoader:
            problems.append("a custom iterator_train (replicas batch arrays directly)")
        for key in self.get_params_for("iterator_train"):
            if key in LOADER_OPTIONS and not reads_dataset:
                problems.append(f"iterator_train__{key} (it configures the DataLoader that "
                                "reads a Dataset on the workers; arrays are batched directly)")
            elif key not in WORKER_ITERATOR_OPTIONS + LOADER_OPTIONS:
                problems.append(f"iterator_train__{key} (daskdist plans the batches itself; "
                                "see docs/skorch.md)")
        if self.compile:
            problems.append("compile=True")
        if self.use_caching not in (False, "auto"):
            problems.append("use_caching=True (there are no per-batch predictions to cache)")
        for method in PER_BATCH_METHODS:
            if getattr(type(self), method) is not getattr(self._skorch_base, method):
                problems.append(f"an overridden {method}() (replicas run their own loop)")
        problems += step_problems(self, self.get_strategy())
        reduction = getattr(self.criterion_, "reduction", "mean")
        if reduction != "mean":
            problems.append(f"criterion with reduction={reduction!r} (averaging needs 'mean')")
        self._holdout()
        check_streaming(self.streaming, self.buffer_chunks)
        if problems:
            raise ValueError(
                f"{type(self).__name__} cannot train with: " + "; ".join(problems) + ". "
                "See the table of skorch parameters on workers in docs/skorch.md."
            )
