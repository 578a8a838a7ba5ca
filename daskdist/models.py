"""Small ready-made modules for examples, pipelines and benchmarks."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["MLP", "SmallCNN"]


class MLP(nn.Module):
    """A multi-layer perceptron.

    Parameters
    ----------
    n_features : int or None
        Inputs per sample; None infers it from the first batch (``LazyLinear``).
    hidden : sequence of int
        Width of each hidden layer.
    n_outputs : int
        Outputs (classes or target columns); the estimators fill it in from
        the data when it is not given.
    dropout : float
        Dropout after each hidden layer.
    output : {"softmax", "linear"}
        ``"softmax"`` gives class probabilities (skorch's classifier
        default with ``NLLLoss``); ``"linear"`` gives raw outputs.
    """

    def __init__(self, n_features=None, hidden=(64,), n_outputs=10, dropout=0.0,
                 output="softmax"):
        super().__init__()
        if output not in ("softmax", "linear"):
            raise ValueError(f"output must be 'softmax' or 'linear', got {output!r}.")
        layers, width = [], n_features
        for h in hidden:
            layers.append(nn.Linear(width, h) if width else nn.LazyLinear(h))
            layers.append(nn.ReLU())
            if dropout:
                layers.append(nn.Dropout(dropout))
            width = h
        layers.append(nn.Linear(width, n_outputs) if width else nn.LazyLinear(n_outputs))
        self.net = nn.Sequential(*layers)
        self.output = output

    def forward(self, X):
        """Class probabilities (or raw outputs) for a batch."""
        out = self.net(X.reshape(X.shape[0], -1))
        return torch.softmax(out, dim=-1) if self.output == "softmax" else out


class SmallCNN(nn.Module):
    """A two-convolution network for small single-channel images (digits, 8x8).

    Parameters
    ----------
    side : int
        Image side; flat inputs of ``side * side`` values are reshaped.
    channels : int
        Channels of the first convolution (the second has twice as many).
    n_outputs : int
        Classes.
    """

    def __init__(self, side=8, channels=16, n_outputs=10):
        super().__init__()
        self.side = side
        self.features = nn.Sequential(
            nn.Conv2d(1, channels, 3, padding=1), nn.ReLU(),
            nn.Conv2d(channels, 2 * channels, 3, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(2),
        )
        self.head = nn.Linear(8 * channels, n_outputs)

    def forward(self, X):
        """Class probabilities (or raw outputs) for a batch."""
        X = X.reshape(X.shape[0], 1, self.side, self.side)
        return torch.softmax(self.head(self.features(X).flatten(1)), dim=-1)
