"""daskdist: data-parallel PyTorch training on Dask, behind scikit-learn estimators."""

from . import config  # noqa: F401  (registers daskdist's Dask config defaults)
from .callbacks import Checkpoint
from .clients import cluster_client, embedded_cluster
from .engine import EpochResult, ShardFailedError, Trainer
from .estimators import DaskNeuralNetClassifier, DaskNeuralNetRegressor
from .models import MLP, SmallCNN
from .replica import NonFiniteError
from .sharding import holdout_split, plan_shards
from .spec import ModelSpec
from .state import TrainingState
from .strategies import (
    DDP,
    SSP,
    STRATEGIES,
    Async,
    Hierarchical,
    LocalSGD,
    Pipeline,
    Strategy,
    Sync,
    resolve_strategy,
)

__version__ = "0.1.0"

__all__ = [
    "DaskNeuralNetClassifier",
    "DaskNeuralNetRegressor",
    "Trainer",
    "EpochResult",
    "ShardFailedError",
    "NonFiniteError",
    "ModelSpec",
    "TrainingState",
    "Checkpoint",
    "Strategy",
    "Sync",
    "LocalSGD",
    "Hierarchical",
    "Async",
    "SSP",
    "DDP",
    "Pipeline",
    "STRATEGIES",
    "resolve_strategy",
    "plan_shards",
    "holdout_split",
    "cluster_client",
    "embedded_cluster",
    "MLP",
    "SmallCNN",
]
