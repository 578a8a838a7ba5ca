"""The strategy interface: what a round does and how its results are combined.

The driver (:class:`daskdist.driver.trainer.Trainer`) moves futures; a strategy
decides what each replica computes in a round and how the contributions become
the next training state. Strategies are small objects; options that belong to
one strategy are its attributes, set from an estimator with ``strategy__<name>``.
"""

from __future__ import annotations

import copy
import functools
import inspect

from ..worker.aggregation import submit_tree

__all__ = ["Strategy"]


class Strategy:
    """Base class of synchronisation strategies.

    Subclasses set :attr:`name`, the replica task :attr:`replica_task` and the
    aggregation root :attr:`finalize`, and say how an epoch's steps are grouped
    into rounds with :meth:`round_sizes`.
    """

    #: Name used with ``strategy=`` on the estimators.
    name: str = ""
    #: ``task(spec, shard, state, plan) -> Contribution``, run on each replica.
    replica_task = None
    #: ``finalize(spec, state, *partials, plan=..., replica_workers=...) -> TrainingState``.
    finalize = None
    #: None, or ``drive_epoch(trainer, lr, epoch_round)``: the strategy runs each epoch's
    #: loop from the client itself (updates applied as they arrive, rounds with a deadline)
    #: and leaves the epoch's final state as the trainer's state.
    drive_epoch = None

    def round_sizes(self, steps_per_epoch: int) -> list[int]:
        """Steps in each round of an epoch of ``steps_per_epoch`` steps."""
        raise NotImplementedError

    def rounds_per_epoch(self, steps_per_epoch: int, n_replicas: int) -> int:
        """Rows an epoch adds to ``rounds_`` (about, where replicas go at their own pace)."""
        return len(self.round_sizes(steps_per_epoch))

    def replicas_for(self, n_workers: int) -> int:
        """Replicas a fit runs on ``n_workers`` workers when it is not told (one per worker)."""
        return n_workers

    def place_replicas(self, workers: list[str], n: int) -> list[str]:
        """The worker of each of ``n`` replicas (and its shard): round the sorted workers."""
        return [workers[i % len(workers)] for i in range(n)]

    def check_model(self, spec) -> None:  # noqa: B027 - optional
        """Raise ``ValueError`` if the strategy cannot train the model of ``spec``.

        Called on the client before any data is sent.
        """

    def check_replicas(self, replica_workers: list[str]) -> None:  # noqa: B027 - optional
        """Raise ``ValueError`` if the strategy cannot run these replicas.

        Called with each replica's worker before any data is sent.
        """

    def submit_round(self, trainer, state, plans):
        """Queue one round; return its output (by default the next state's placeholder).

        Tasks go through :meth:`daskdist.driver.trainer.Trainer.submit`; the driver
        sends them and replaces the placeholders by futures.

        Parameters
        ----------
        trainer : daskdist.driver.trainer.Trainer
            The driver (client, spec future, shard futures, placement).
        state : Future or object
            The epoch's starting state (a future) or the previous round's output.
        plans : list of RoundPlan
            One plan per replica.
        """
        parts = trainer.submit_replicas(type(self).replica_task, state, plans)
        return submit_tree(
            trainer.submit, parts, trainer.replica_workers, type(self).finalize,
            trainer.spec_future, state, plan=plans[0], replica_workers=trainer.replica_workers,
            key=functools.partial(trainer.task_key, "average", epoch=plans[0].epoch),
            round_index=plans[0].round,
        )

    @staticmethod
    def submit_exchange(trainer, task, state, plans):
        """Queue ``task(spec, shard, *previous, plan=, replica_workers=)`` on every replica.

        For strategies whose replicas exchange updates and each apply their
        average themselves (``sync``, compressed ``local_sgd``): ``previous``
        is the epoch's starting state, or every replica's output of the
        previous round. Returns the list of the replicas' outputs.
        """
        previous = state if isinstance(state, list) else [state]
        return [
            trainer.submit(
                task, trainer.spec_future, trainer.shards[p.replica], *previous, plan=p,
                replica_workers=trainer.replica_workers,
                key=trainer.task_key("round", p.round, p.replica, epoch=p.epoch),
                worker=trainer.replica_workers[p.replica])
            for p in plans
        ]

    def tracked(self, round_output):
        """The future whose completion marks the end of a submitted round."""
        return round_output

    def state_round(self, plan_round: int) -> int:
        """The ``round`` counter of the state held by round ``plan_round``'s tracked output.

        By default the output is the state after the round.
        """
        return plan_round + 1

    def finish_epoch(self, trainer, round_output, plans):
        """Turn the last round's output into the future of the epoch's final state."""
        return round_output

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
