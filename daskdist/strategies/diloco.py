"""``diloco``: long local phases, then an outer optimizer step on the mean parameter change.

The policy; the replicas' tasks are those of compressed ``local_sgd``
(:mod:`daskdist.worker.delta_tasks`), with the outer step of
:mod:`daskdist.worker.outer` where the mean change is applied.
"""

from __future__ import annotations

import numbers

from ..worker.fragments import fragment_bounds
from ..worker.outer import OuterSGD
from .hierarchical import check_groups, resolve_groups
from .local_sgd import LocalSGD

__all__ = ["DiLoCo"]


class DiLoCo(LocalSGD):
    """DiLoCo: ``sync_every`` inner steps per replica, then one outer SGD step.

    Implements Douillard et al. 2023, "DiLoCo: Distributed Low-Communication
    Training of Language Models" (arXiv 2311.08105). The estimator's
    optimizer is the *inner* optimizer; each replica keeps its own inner
    state (momentum, Adam moments) from round to round and epoch to epoch,
    and it is never averaged. Every ``sync_every`` inner steps the
    replicas' parameter changes are averaged (weighted by the samples each
    trained on) into a pseudo-gradient, and an *outer* SGD with Nesterov
    momentum updates the global parameters, from which every replica starts
    its next round (the maths in :mod:`daskdist.worker.outer`). The paper
    pairs an AdamW inner optimizer with ``outer_lr=0.7``,
    ``outer_momentum=0.9`` and Nesterov momentum, the defaults here.

    With ``outer_lr=1``, ``outer_momentum=0`` and an inner optimizer without
    state (plain SGD) it equals ``local_sgd``. Replicas exchange their
    parameter changes, packed with ``compression`` (``"fp16"``, ``"bf16"``
    or ``"topk"`` with error feedback) or as float32, and each applies the
    outer step itself, as compressed ``local_sgd`` does; the outer momentum
    is training state (``TrainingState.outer``): checkpoints carry it, and a
    resumed or recovered fit continues exactly.

    With ``overlap=True`` each round's outer step is applied one round
    late, while the replicas go on from their own parameters, so that the
    exchange runs behind the next round's inner steps: the overlap of
    streaming DiLoCo (Douillard et al. 2025, arXiv 2501.18512), here for
    the whole parameter vector at once, with the delayed-averaging rule of
    :mod:`daskdist.worker.overlap_tasks`. With ``fragments=K`` as well
    (streaming DiLoCo), the parameters are cut into ``K`` fragments of whole
    tensors and a round of ``sync_every / K`` inner steps exchanges one of
    them, in turn, so that each fragment takes an outer step every
    ``sync_every`` inner steps and each exchange carries ``1/K`` of the
    parameters (:mod:`daskdist.worker.fragments`); an epoch's last round
    exchanges them all.

    With ``groups`` as well as ``overlap=True``, the replicas' changes are
    summed within each group first (``"host"``: the replicas whose workers
    share a host), on the group's first worker, and each replica fetches
    the groups' sums instead of every replica's change, so that between
    hosts one message per group travels to each replica, as under
    ``hierarchical``; the outer step is then applied two rounds late
    (:mod:`daskdist.worker.overlap_tasks`). Without overlap the outer step
    needs every replica's change at once, so ``groups`` is refused.

    Parameters
    ----------
    sync_every : int
        Inner optimizer steps between two outer steps (the paper's ``H``).
    outer_lr : float
        Outer learning rate, positive.
    outer_momentum : float
        Outer momentum, in ``[0, 1)``.
    nesterov : bool
        Nesterov momentum for the outer step (needs ``outer_momentum > 0``).
    compression : {None, "fp16", "bf16", "topk"}
        How the parameter changes are packed for the exchange.
    density : float
        Share of entries ``"topk"`` sends per round.
    overlap : bool
        Apply each round's outer step one round late, so that the exchange
        runs while the next round computes (:class:`~daskdist.strategies.LocalSGD`).
    fragments : int
        Fragments of the parameters synchronised in turn (streaming DiLoCo;
        needs ``overlap=True`` and ``sync_every`` a multiple of it).
    groups : None, "host" or list of list of int
        Sum the changes within groups of replicas before the exchange
        (needs ``overlap=True``; not with ``fragments``). None: no groups.
    balance : bool
        Inner steps and shard sizes that follow each replica's measured
        speed (as for :class:`~daskdist.strategies.LocalSGD`); the
        pseudo-gradient weights each replica's change by its samples.
    """

    name = "diloco"

    def __init__(self, sync_every: int = 8, outer_lr: float = 0.7,
                 outer_momentum: float = 0.9, nesterov: bool = True,
                 compression: str | None = None, density: float = 0.01,
                 overlap: bool = False, fragments: int = 1, groups=None,
                 balance: bool = False):
        self.outer_lr = outer_lr
        self.groups = groups
        self.outer_momentum = outer_momentum
        self.nesterov = nesterov
        self.fragments = fragments
        super().__init__(sync_every=sync_every, compression=compression, density=density,
                         overlap=overlap, balance=balance)

    @property
    def exchanges_deltas(self) -> bool:
        return True

    def validate(self) -> None:
        super().validate()
        for name in ("outer_lr", "outer_momentum"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise ValueError(f"{name} must be a number, got {value!r}.")
        if not self.outer_lr > 0:
            raise ValueError(f"outer_lr must be positive, got {self.outer_lr!r}.")
        if not 0 <= self.outer_momentum < 1:
            raise ValueError(f"outer_momentum must be in [0, 1), got {self.outer_momentum!r}.")
        if not isinstance(self.nesterov, bool):
            raise ValueError(f"nesterov must be True or False, got {self.nesterov!r}.")
        if self.nesterov and not self.outer_momentum:
            raise ValueError("nesterov=True needs outer_momentum > 0 (as torch's SGD does); "
                             "pass nesterov=False for an outer step without momentum.")
        k = self.fragments
        if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
            raise ValueError(f"fragments must be a positive integer, got {k!r}.")
        if k > 1 and not self.overlap:
            raise ValueError(f"fragments={k} needs overlap=True: streaming DiLoCo exchanges "
                             "each fragment while the next round computes.")
        if self.groups is not None:
            self._check_groups()
        if self.sync_every % k:
            raise ValueError(f"sync_every={self.sync_every} must be a multiple of fragments={k}: "
                             f"a round of sync_every / fragments steps exchanges one fragment.")

    def _check_groups(self) -> None:
        if self.groups != "host":
            check_groups(self.groups)
        if not self.overlap:
            raise ValueError("groups needs overlap=True: without overlap every replica's change "
                             "is needed at once for the outer step, so groups would only add "
                             "a step. Use strategy='hierarchical' for grouped local SGD.")
        if self.fragments > 1:
            raise ValueError(f"groups cannot be combined with fragments={self.fragments}: "
                             "grouped sums are folded two rounds late, streaming DiLoCo's "
                             "fragments one round late.")

    def overlap_groups(self, replica_workers: list[str]):
        if self.groups is None:
            return None
        return resolve_groups(None if self.groups == "host" else self.groups, replica_workers)

    def elastic_refusal(self) -> str | None:
        if isinstance(self.groups, (list, tuple)):
            return (f"strategy={self.name!r} was given its groups as lists of replicas; "
                    "groups='host' follows a changed replica count")
        return super().elastic_refusal()

    def check_replicas(self, replica_workers: list[str]) -> None:
        self.overlap_groups(replica_workers)

    def check_model(self, spec) -> None:
        if self.fragments > 1:
            fragment_bounds([p.numel() for p in spec.module.parameters()], self.fragments)

    def round_steps(self) -> int:
        return self.sync_every // self.fragments

    def round_sizes(self, steps_per_epoch: int) -> list[int]:
        k = self.round_steps()
        return [min(k, steps_per_epoch - s) for s in range(0, steps_per_epoch, k)]

    def plan_fields(self) -> dict:
        outer = OuterSGD(float(self.outer_lr), float(self.outer_momentum), self.nesterov)
        return {**super().plan_fields(), "outer": outer, "fragments": int(self.fragments)}
