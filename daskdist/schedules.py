"""Per-step schedules: skorch's ``LRScheduler(step_every="batch")``, stepped on the workers.

A per-step schedule (warm-up, ``OneCycleLR``, cosine annealing, ``LambdaLR``,
``SequentialLR`` ...) is a function of the step count only. Before each epoch
the client steps the callbacks' torch schedulers through the epoch's steps on
a stand-in optimizer (the workers' optimizer, with the same parameter
groups, that never steps itself) and writes down the hyperparameters each
step sees: the learning rate, and whatever else a scheduler changes
(``OneCycleLR`` also cycles the momentum). That table, a
:class:`~daskdist.plan.StepTable`, travels with every round's plan, and
each replica sets step ``k``'s values before its ``k``-th step
(:func:`daskdist.worker.stepping.set_hyper`). So the schedule acts inside the
replicas' loops, exactly, while its state stays on the client.

The step a schedule counts is the step of a single-process run on the same
data: for ``sync``, ``ddp`` and ``pipeline``, the global step; for
``local_sgd`` and ``hierarchical``, each replica's local step (step ``k`` of
an epoch for every replica). An epoch has :attr:`net.steps_per_epoch_`
steps. Where the schedule is in a fit is counted in ``history``
(``schedule_steps``: steps per completed epoch), so that a resumed or
continued fit takes it up exactly where it was.
"""

from __future__ import annotations

import numbers
import warnings

import numpy as np
from skorch.callbacks import LRScheduler

from .plan import StepTable
from .spec import param_groups

__all__ = ["batch_schedulers", "EpochSchedules", "SCHEDULE_STEPS", "steps_done"]

#: history key: the steps a per-step schedule took in each completed epoch
SCHEDULE_STEPS = "schedule_steps"
#: parameter-group keys that are bookkeeping, not hyperparameters
_NOT_HYPER = ("params", "initial_lr")


def batch_schedulers(callbacks) -> list:
    """``(name, callback)`` of the ``LRScheduler`` callbacks that step every batch."""
    return [(name, cb) for name, cb in callbacks
            if isinstance(cb, LRScheduler) and cb.step_every == "batch"]


def _hyper(group: dict) -> dict:
    """The numeric hyperparameters of a parameter group (numbers, and tuples of numbers)."""
    out = {}
    for key, value in group.items():
        if key in _NOT_HYPER or isinstance(value, bool):
            continue
        if isinstance(value, numbers.Real):
            out[key] = float(value)
        elif isinstance(value, tuple) and value and all(
                isinstance(v, numbers.Real) and not isinstance(v, bool) for v in value):
            out[key] = tuple(float(v) for v in value)
    return out


class EpochSchedules:
    """The per-step schedules of a fit: one :class:`~daskdist.plan.StepTable` per epoch.

    Parameters
    ----------
    net : DaskNet
        The estimator; its batch-stepping ``LRScheduler`` callbacks get their
        ``lr_scheduler_`` from here (stepping a stand-in optimizer).
    spec : ModelSpec
        What the workers build their optimizer from.
    done : int
        Steps the schedule took before this fit (``history``'s
        ``schedule_steps``).
    """

    def __init__(self, net, spec, done: int):
        self.callbacks = [cb for _, cb in batch_schedulers(net.callbacks_)]
        kwargs = dict(spec.optimizer_kwargs)
        groups = param_groups(net.module_.named_parameters(), kwargs.pop("param_groups", []))
        self.optimizer = spec.optimizer(groups, **kwargs)
        self.configured = [_hyper(g) for g in self.optimizer.param_groups]
        for cb in self.callbacks:
            scheduler_kwargs = dict(cb.kwargs)
            scheduler_kwargs.pop("last_epoch", None)
            cb.lr_scheduler_ = cb.policy_(self.optimizer, **scheduler_kwargs)
            cb.batch_idx_ = done
        self.step = 0
        self._advance(done)
        self.step = done
        self.last = None

    def _advance(self, n: int) -> list:
        """Step every scheduler ``n`` times; the groups' hyperparameters before each step."""
        seen = []
        with warnings.catch_warnings():
            # the stand-in optimizer never steps: torch's order warning does not apply
            warnings.filterwarnings("ignore", message="Detected call of `lr_sched")
            for k in range(n):
                seen.append([_hyper(g) for g in self.optimizer.param_groups])
                for cb in self.callbacks:
                    try:
                        cb.lr_scheduler_.step()
                    except ValueError as error:
                        raise ValueError(
                            f"{type(cb.lr_scheduler_).__name__} refused step "
                            f"{self.step + k + 1} of the fit ({error}). daskdist runs "
                            "net.steps_per_epoch_ steps per epoch: size the schedule with it "
                            "(OneCycleLR(total_steps=max_epochs * net.steps_per_epoch_))."
                        ) from None
        return seen

    def next_epoch(self, n_steps: int) -> StepTable:
        """The table of the next epoch's ``n_steps`` steps (the schedulers move past them)."""
        seen = self._advance(n_steps)
        self.step += n_steps
        columns = [("lr", None)]
        for key in sorted({k for groups in seen for g in groups for k in g} - {"lr"}):
            if any(g.get(key) != conf.get(key)
                   for groups in seen for g, conf in zip(groups, self.configured)):
                value = seen[0][0][key]
                columns += ([(key, i) for i in range(len(value))] if isinstance(value, tuple)
                            else [(key, None)])
        values = np.array([[[g[key] if i is None else g[key][i] for key, i in columns]
                            for g in groups] for groups in seen], dtype=np.float64)
        self.last = StepTable(tuple(columns), values)
        return self.last

    def epoch_done(self, net) -> None:
        """Record the finished epoch's schedule in ``history`` and on the client's optimizer."""
        table, self.last = self.last, None
        net.history.record(SCHEDULE_STEPS, len(table))
        for cb in self.callbacks:
            cb.batch_idx_ = self.step
            if cb.event_name is not None:
                net.history.record(cb.event_name, table.values[:, 0, 0].tolist())
        for group, now in zip(net.optimizer_.param_groups, self.optimizer.param_groups):
            group.update({k: v for k, v in _hyper(now).items() if k in group})


def steps_done(history) -> int:
    """Steps a per-step schedule took in the completed epochs of ``history``."""
    return int(sum(row.get(SCHEDULE_STEPS, 0) for row in history if "train_loss" in row))
