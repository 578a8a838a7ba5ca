"""daskdist: data-parallel PyTorch training on Dask, behind scikit-learn estimators."""

from . import _moved, config  # noqa: F401  (config registers daskdist's Dask config defaults)
from ._compat import incremental_search
from .callbacks import Checkpoint, GradientValueClipping
from .clusters.embedded import cluster_client, embedded_cluster
from .data.holdout import holdout_split
from .data.sharding import plan_shards
from .driver.trainer import EpochResult, Trainer
from .errors import NonFiniteError, ReplicaDriftWarning, ShardFailedError
from .estimators import DaskNeuralNetClassifier, DaskNeuralNetRegressor
from .models import MLP, SmallCNN
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

_moved.install()  # old import paths of moved modules, for one release
incremental_search.install()  # dask-ml's HyperbandSearchCV with the dask installed

__version__ = "0.1.0"

__all__ = [
    "DaskNeuralNetClassifier",
    "DaskNeuralNetRegressor",
    "Trainer",
    "EpochResult",
    "ShardFailedError",
    "NonFiniteError",
    "ReplicaDriftWarning",
    "ModelSpec",
    "TrainingState",
    "GradientValueClipping",
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
