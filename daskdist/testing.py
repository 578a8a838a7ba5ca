"""Helpers for testing code that uses daskdist: small modules and data.

Modules defined here are importable on every worker, so tests can ship them
to real worker processes by reference.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["TinyNet", "make_classification"]


class TinyNet(torch.nn.Module):
    """A small softmax classifier: Linear → Tanh → Linear → softmax."""

    def __init__(self, n_features=20, hidden=16, n_outputs=3):
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(n_features, hidden), torch.nn.Tanh(),
            torch.nn.Linear(hidden, n_outputs))

    def forward(self, X):
        """Class probabilities (or raw outputs) for a batch."""
        return torch.softmax(self.net(X), dim=-1)


def make_classification(n_samples=240, n_features=20, n_classes=3, seed=0):
    """Linearly separable-ish float32 features and integer labels."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n_samples, n_features)).astype(np.float32)
    y = (X @ rng.normal(size=(n_features, n_classes))).argmax(1)
    return X, y
