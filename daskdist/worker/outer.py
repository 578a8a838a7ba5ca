"""DiLoCo's outer optimizer: the mean parameter change of a round as a pseudo-gradient.

In DiLoCo (Douillard et al. 2023, "DiLoCo: Distributed Low-Communication
Training of Language Models", arXiv 2311.08105) every replica starts a round
from the global parameters ``theta``, takes ``H`` steps of its own (inner)
optimizer, and ends at ``theta_i``. The round's pseudo-gradient is the
sample-weighted mean change, negated::

    g = theta - sum_i w_i theta_i / sum_i w_i

and an outer SGD with Nesterov momentum, torch's ``SGD(lr, momentum,
nesterov=True)`` with no dampening or weight decay, takes one step on it::

    m     = g                      (the first outer step)
    m     = momentum * m + g       (later ones)
    step  = g + momentum * m       (nesterov)     or   m   (without)
    theta = theta - lr * step

With ``lr=1`` and ``momentum=0`` this is ``theta`` plus the mean change, the
mean of the replicas' parameters: local SGD. ``m`` is shared training state
(``TrainingState.outer``): every replica computes it alike from the same
changes, and it travels with checkpoints.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["OuterSGD"]


@dataclass(frozen=True)
class OuterSGD:
    """The outer SGD of ``diloco``.

    Attributes
    ----------
    lr : float
        Outer learning rate.
    momentum : float
        Outer momentum (0: none).
    nesterov : bool
        Nesterov momentum, as in the paper.
    """

    lr: float = 0.7
    momentum: float = 0.9
    nesterov: bool = True

    def step(self, params: np.ndarray, mean_change: np.ndarray, outer: dict):
        """New parameters and outer state after one outer step on ``-mean_change``.

        Parameters
        ----------
        params : numpy.ndarray
            The global parameters the round started from.
        mean_change : numpy.ndarray
            The replicas' sample-weighted mean parameter change.
        outer : dict
            The outer state before the step (``{}`` before the first).

        Returns
        -------
        params : numpy.ndarray
        outer : dict
        """
        g = -mean_change.astype(np.float32, copy=False)
        if not self.momentum:
            return params - np.float32(self.lr) * g, {}
        previous = outer.get("momentum")
        momentum = np.float32(self.momentum)
        m = g.copy() if previous is None else momentum * previous + g
        step = g + momentum * m if self.nesterov else m
        return params - np.float32(self.lr) * step, {"momentum": m}
