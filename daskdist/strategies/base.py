"""The strategy interface: what a round does and how its results are combined.

The driver (:class:`daskdist.driver.trainer.Trainer`) moves futures; a
strategy decides what each replica computes and how the contributions become
the next training state. The driver calls one method per epoch,
:meth:`Strategy.train_epoch`, with an
:class:`~daskdist.driver.context.EpochContext`, the only part of the driver a
strategy sees. Most strategies plug into the default round loop
(:class:`RoundStrategy`, :mod:`daskdist.driver.round_loop`); those that drive
their own epoch subclass :class:`~daskdist.driver.driven.DrivenEpoch`.
Strategies are small objects; options that belong to one strategy are its
attributes, set from an estimator with ``strategy__<name>``.
"""

from __future__ import annotations

import copy
import functools
import inspect

from ..driver.round_loop import run_rounds
from ..driver.tree import submit_tree
from ..worker.own_state import replica_owner

__all__ = ["Strategy", "RoundStrategy"]


class Strategy:
    """Base class of synchronisation strategies.

    Subclasses set :attr:`name`, say how an epoch's steps are grouped into
    rounds (:meth:`round_sizes`) and run an epoch (:meth:`train_epoch`).
    """

    #: Name used with ``strategy=`` on the estimators.
    name: str = ""
    #: Whether updates may be applied to a newer state than they started from
    #: (the history then summarises their staleness per epoch).
    asynchronous: bool = False
    #: How replicas pack what they send (None: float32 as it is); see
    #: :mod:`daskdist.compression`.
    compression: str | None = None
    #: Share of entries ``"topk"`` sends.
    density: float = 0.01
    #: Round deadline, a multiple of the running median of round durations
    #: (``sync`` and ``local_sgd``; None: every round waits for every replica).
    deadline: float | None = None
    #: Shard sizes and local steps that follow each replica's measured speed
    #: (``local_sgd``, ``hierarchical``, ``diloco``; :mod:`daskdist.driver.balance`).
    balance: bool = False

    def train_epoch(self, ctx) -> None:
        """Run one epoch (one attempt at it) through ``ctx``; end with ``ctx.finish``.

        Parameters
        ----------
        ctx : daskdist.driver.context.EpochContext
            The driver, as a strategy sees it.
        """
        raise NotImplementedError

    def round_sizes(self, steps_per_epoch: int) -> list[int]:
        """Steps in each round of an epoch of ``steps_per_epoch`` steps."""
        raise NotImplementedError

    def round_steps(self) -> int:
        """Local steps in a replica's round (1: a round is one step)."""
        return 1

    def plan_fields(self) -> dict:
        """What every round's :class:`~daskdist.plan.RoundPlan` carries of this strategy."""
        return {"compression": self.compression, "density": self.density}

    def staleness_bound(self) -> int | None:
        """Rounds a replica may run ahead of the slowest one (None: no bound)."""
        return None

    def rounds_per_epoch(self, steps_per_epoch: int, n_replicas: int) -> int:
        """Rows an epoch adds to ``rounds_`` (about, where replicas go at their own pace)."""
        return len(self.round_sizes(steps_per_epoch))

    def replicas_for(self, n_workers: int) -> int:
        """Replicas a fit runs on ``n_workers`` workers when it is not told (one per worker)."""
        return n_workers

    def place_replicas(self, workers: list[str], n: int) -> list[str]:
        """The worker of each of ``n`` replicas (and its shard): round the sorted workers."""
        return [workers[i % len(workers)] for i in range(n)]

    #: Whether every replica applies the same update to its own copy of the state (the
    #: driver compares the copies once per epoch: :mod:`daskdist.driver.agreement`).
    replica_copies = False

    def owners(self, replica_workers: list[str]) -> list[str]:
        """Who may keep a part of its own between rounds (:mod:`daskdist.worker.own_state`).

        Every replica, by default; the driver gathers their parts at the end
        of each epoch and after a lost worker.
        """
        return [replica_owner(i) for i in range(len(replica_workers))]

    def check_model(self, spec) -> None:  # noqa: B027 - optional
        """Raise ``ValueError`` if the strategy cannot train the model of ``spec``.

        Called on the client before any data is sent.
        """

    def check_replicas(self, replica_workers: list[str]) -> None:  # noqa: B027 - optional
        """Raise ``ValueError`` if the strategy cannot run these replicas.

        Called with each replica's worker before any data is sent.
        """

    def elastic_refusal(self) -> str | None:
        """Why the replica count cannot change between epochs (None: it can).

        Asked by :func:`daskdist.driver.membership.follow_workers` before it
        adds or merges replicas; moving replicas between workers is always
        allowed.
        """
        return None

    def resizes_mid_epoch(self) -> bool:
        """Whether replicas may join or leave between two rounds of an epoch.

        Where they may, the driver re-plans the shards at the next round
        boundary after workers joined or left; elsewhere at the next epoch
        boundary (:mod:`daskdist.driver.membership`). It needs a round loop
        that can stop after any round with a whole state, and replicas that
        keep nothing of their own between rounds.
        """
        return False

    # scikit-learn style parameters, so strategies print, compare and clone well.
    def get_params(self, deep: bool = False) -> dict:
        """The constructor arguments of this strategy."""
        names = [p for p in inspect.signature(type(self).__init__).parameters if p != "self"]
        return {n: getattr(self, n) for n in names}

    def set_params(self, **params) -> Strategy:
        """Set options (``strategy__<name>`` on the estimators)."""
        valid = self.get_params()
        for key, value in params.items():
            if key not in valid:
                raise ValueError(
                    f"Strategy {self.name!r} has no option {key!r}; its options are "
                    f"{sorted(valid)}."
                )
            setattr(self, key, value)
        self.validate()
        return self

    def validate(self) -> None:
        """Raise ``ValueError`` on invalid options."""

    def copy(self) -> Strategy:
        """A copy that a fit may configure without touching the original."""
        return copy.deepcopy(self)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items())
        return f"{type(self).__name__}({args})"

    def __eq__(self, other) -> bool:
        return type(self) is type(other) and self.get_params() == other.get_params()

    __hash__ = object.__hash__


class RoundStrategy(Strategy):
    """A strategy that plugs into the default round loop (``sync``, ``local_sgd`` ...).

    The loop (:func:`daskdist.driver.round_loop.run_rounds`) submits the
    epoch's rounds a few ahead of the workers, through :meth:`submit_round`,
    and tracks each round's output (:meth:`tracked`, holding state round
    :meth:`state_round`); :meth:`finish_epoch` turns the last round's output
    into the epoch's final state. By default a round is one task per replica
    (:attr:`replica_task`) and a tree of averages whose root is
    :attr:`finalize`.
    """

    #: ``task(spec, shard, state, plan) -> Contribution``, run on each replica.
    replica_task = None
    #: ``finalize(spec, state, *partials, plan=..., replica_workers=...) -> TrainingState``.
    finalize = None

    def train_epoch(self, ctx) -> None:
        """Run the epoch's rounds in the default round loop."""
        run_rounds(ctx, self)

    def resizes_mid_epoch(self) -> bool:
        return True

    def submit_round(self, ctx, state, plans):
        """Queue one round; return its output (by default the next state's placeholder).

        Parameters
        ----------
        ctx : daskdist.driver.context.EpochContext
            The driver (submit through ``ctx.submit``; queued tasks go out together).
        state : Future or placeholder
            The epoch's starting state (a future) or the previous round's output.
        plans : list of RoundPlan
            One plan per replica.
        """
        parts = self.submit_replicas(ctx, type(self).replica_task, state, plans)
        workers = ctx.info.replica_workers
        return submit_tree(
            ctx.submit, parts, workers, type(self).finalize, ctx.spec, state, plan=plans[0],
            replica_workers=workers, key=functools.partial(ctx.key, "average"),
            round_index=plans[0].round,
        )

    @staticmethod
    def submit_replicas(ctx, task, state, plans):
        """Queue ``task(spec, shard, state, plan)`` on every replica's worker.

        ``state`` is the state every replica starts from, or a list of one
        (copy of it) per plan.
        """
        states = state if isinstance(state, list) else [state] * len(plans)
        return [ctx.submit(task, ctx.spec, ctx.shards[p.replica], s, p,
                           key=ctx.key("round", p.round, p.replica),
                           worker=ctx.info.replica_workers[p.replica])
                for p, s in zip(plans, states)]

    @staticmethod
    def submit_exchange(ctx, task, state, plans):
        """Queue ``task(spec, shard, *previous, plan=, replica_workers=)`` on every replica.

        For strategies whose replicas exchange updates and each apply their
        average themselves (``sync``, compressed ``local_sgd``): ``previous``
        is the epoch's starting state, or every replica's output of the
        previous round. Returns the list of the replicas' outputs.
        """
        previous = state if isinstance(state, list) else [state]
        workers = ctx.info.replica_workers
        return [ctx.submit(task, ctx.spec, ctx.shards[p.replica], *previous, plan=p,
                           replica_workers=workers, key=ctx.key("round", p.round, p.replica),
                           worker=workers[p.replica])
                for p in plans]

    def tracked(self, round_output):
        """The future whose completion marks the end of a submitted round."""
        return round_output

    def state_round(self, plan_round: int) -> int:
        """The ``round`` counter of the state held by round ``plan_round``'s tracked output.

        By default the output is the state after the round.
        """
        return plan_round + 1

    def finish_epoch(self, ctx, round_output, plans):
        """Turn the last round's output into the (placeholder of the) epoch's final state."""
        return round_output
