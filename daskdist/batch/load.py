"""Reading and validating pipeline files before anything starts.

A pipeline file is checked in two passes, and the first problem found is
raised as :class:`PipelineError`, whose one-line message names the file, the
field and what was expected:

1. against the JSON schema beside this module (``pipeline-schema.yaml``):
   unknown keys, wrong types, missing required fields;
2. against the installed code and the file system: import paths resolve to
   the right kind of object, constructor parameters exist, data files exist,
   estimator parameters and scorer names are known.
"""

from __future__ import annotations

import copy
import glob
import importlib
import inspect
import os
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ..schema_errors import best_error, describe, did_you_mean

__all__ = ["Pipeline", "PipelineError", "load_pipeline", "parse_overrides", "resolve_import"]

SCHEMA_PATH = Path(__file__).with_name("pipeline-schema.yaml")

#: Data sets bundled with scikit-learn that a ``data.source: sklearn`` may name.
SKLEARN_DATASETS = ("digits", "iris", "wine", "breast_cancer", "diabetes")
#: Generators a ``data.source: synthetic`` may name.
SYNTHETIC_DATASETS = ("classification", "regression", "weather")
#: Where short names are looked up before they are taken as import paths.
_SHORT_NAMES = {"model.module": "daskdist.models",
                "preprocess": "dask_ml.preprocessing",
                "train.optimizer": "torch.optim",
                "train.criterion": "torch.nn"}
#: Keys of ``train`` that belong to the pipeline, not to the estimator.
_PIPELINE_TRAIN_KEYS = ("estimator", "checkpoint_every")


class PipelineError(ValueError):
    """A pipeline file (or an override) is invalid.

    Parameters
    ----------
    path : str or os.PathLike
        The pipeline file.
    field : str
        Dotted path of the offending field (``train.max_epochs``), or
        ``"-"`` for the file as a whole.
    problem : str
        What is wrong and what was expected.
    """

    def __init__(self, path, field: str, problem: str):
        self.path = str(path)
        self.field = field
        self.problem = problem
        super().__init__(f"{self.path}: {field}: {problem}")


@dataclass(frozen=True)
class Pipeline:
    """A validated pipeline.

    Attributes
    ----------
    path : pathlib.Path
        The file it was read from.
    name : str
        ``name`` from the file, else the file's stem.
    config : dict
        The sections with overrides applied and defaults filled in.
    overrides : dict
        The ``--set`` overrides that were applied (dotted key -> value).
    """

    path: Path
    name: str
    config: dict
    overrides: dict = field(default_factory=dict)

    @property
    def is_classifier(self) -> bool:
        """Whether the pipeline trains a classifier."""
        return self.config["train"]["estimator"] == "classifier"


def parse_overrides(items) -> dict:
    """Parse ``key=value`` strings (``--set``) into a dict; values are read as YAML.

    Raises
    ------
    PipelineError
        For an item without ``=`` or with an empty key.
    """
    overrides = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise PipelineError("--set", item, "expected KEY=VALUE, e.g. train.max_epochs=5")
        try:
            overrides[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError as error:
            raise PipelineError("--set", key, f"the value is not valid YAML ({error})") from None
    return overrides


def load_pipeline(path, overrides: dict | None = None) -> Pipeline:
    """Read, override and validate a pipeline file.

    Parameters
    ----------
    path : str or os.PathLike
        The YAML file.
    overrides : dict, optional
        Dotted keys (``train.max_epochs``) and the values that replace the
        file's; a key whose parent section is missing creates it.

    Returns
    -------
    Pipeline

    Raises
    ------
    PipelineError
        When the file is missing, is not YAML, or fails a check.
    """
    path = Path(path)
    if not path.is_file():
        raise PipelineError(path, "-", "no such file")
    try:
        with open(path, encoding="utf-8") as f:
            config = yaml.safe_load(f)
    except yaml.YAMLError as error:
        raise PipelineError(path, "-", f"not valid YAML: {_one_line(error)}") from None
    if not isinstance(config, dict):
        raise PipelineError(path, "-", "expected a mapping of sections (data, model, train, ...)")
    config = copy.deepcopy(config)
    for key, value in (overrides or {}).items():
        _set_dotted(config, key, value, path)
    _check_schema(config, path)
    name = config.get("name") or path.stem
    _fill_defaults(config, name)
    _check_semantics(config, path)
    return Pipeline(path=path, name=name, config=config, overrides=dict(overrides or {}))


def resolve_import(name: str, *, short_in: str | None = None):
    """Import ``package.module.Object`` (or ``package.module:Object``).

    Parameters
    ----------
    name : str
        A dotted import path, or a bare name looked up in ``short_in``.
    short_in : str, optional
        Module where a bare name (no dot) is looked up first.

    Raises
    ------
    ImportError
        When the module or the attribute does not exist.
    """
    if short_in is not None and "." not in name and ":" not in name:
        module = importlib.import_module(short_in)
        if hasattr(module, name):
            return getattr(module, name)
        raise ImportError(f"{short_in} has no {name!r}")
    module_name, sep, attr = name.partition(":")
    if not sep:
        module_name, _, attr = name.rpartition(".")
    if not module_name:
        raise ImportError(f"{name!r} is not an import path (package.module.Object)")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ImportError(f"cannot import {module_name!r} ({error})") from None
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ImportError(f"{module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    return obj


# -- pass 1: the schema -------------------------------------------------------

def _schema() -> dict:
    with open(SCHEMA_PATH, encoding="utf-8") as f:
        return yaml.safe_load(f)


def _check_schema(config: dict, path: Path) -> None:
    error = best_error(_schema(), config)
    if error is not None:
        raise PipelineError(path, *describe(error))


# -- defaults -------------------------------------------------------------------

def _fill_defaults(config: dict, name: str) -> None:
    config.setdefault("preprocess", [])
    config["model"].setdefault("params", {})
    config["data"].setdefault("params", {})
    evaluate = config.setdefault("evaluate", {})
    evaluate.setdefault("test_size", 0.2)
    evaluate.setdefault("split", "random")
    evaluate.setdefault("random_state", 0)
    classifier = config["train"]["estimator"] == "classifier"
    evaluate.setdefault("metrics", ["accuracy"] if classifier else ["r2"])
    outputs = config.setdefault("outputs", {})
    outputs.setdefault("dir", os.path.join("runs", name))
    outputs.setdefault("predictions", "auto")
    outputs.setdefault("report", "markdown")
    outputs.setdefault("overwrite", False)


# -- pass 2: against the code and the files -----------------------------------

def _check_semantics(config: dict, path: Path) -> None:
    _check_data(config["data"], path)
    for i, step in enumerate(config["preprocess"]):
        cls = _import_field(step["transformer"], f"preprocess[{i}].transformer", path,
                            short_in=_SHORT_NAMES["preprocess"])
        if not (hasattr(cls, "fit") and hasattr(cls, "transform")):
            raise PipelineError(path, f"preprocess[{i}].transformer",
                                f"{step['transformer']!r} is not a transformer "
                                "(expected a class with fit and transform)")
        _check_call(cls, step.get("params", {}), f"preprocess[{i}].params", path)
    module = _import_field(config["model"]["module"], "model.module", path,
                           short_in=_SHORT_NAMES["model.module"])
    import torch

    if not (inspect.isclass(module) and issubclass(module, torch.nn.Module)):
        raise PipelineError(path, "model.module", f"{config['model']['module']!r} is not a "
                            "torch.nn.Module subclass")
    _check_call(module, config["model"]["params"], "model.params", path, partial=True)
    _check_train(config["train"], path)
    _check_metrics(config["evaluate"]["metrics"], path)


def _check_data(data: dict, path: Path) -> None:
    source = data["source"]
    if source == "sklearn" and data["name"] not in SKLEARN_DATASETS:
        raise PipelineError(path, "data.name", f"expected one of: {', '.join(SKLEARN_DATASETS)}; "
                            f"got {data['name']!r}")
    if source == "synthetic" and data["name"] not in SYNTHETIC_DATASETS:
        raise PipelineError(path, "data.name", f"expected one of: "
                            f"{', '.join(SYNTHETIC_DATASETS)}; got {data['name']!r}")
    if source in ("sklearn", "synthetic"):
        return
    files = [("data.path", data["path"])]
    if source == "npy":
        files.append(("data.target_path", data["target_path"]))
    for where, name in files:
        if source in ("zarr", "netcdf") and data.get("generate"):
            continue  # written at run time when missing
        if not glob.glob(os.path.expanduser(name)):
            raise PipelineError(path, where, f"no such file or store: {name!r}")


def _check_train(train: dict, path: Path) -> None:
    from ..estimators import DaskNeuralNetClassifier, DaskNeuralNetRegressor
    from ..strategies import STRATEGIES, resolve_strategy

    cls = DaskNeuralNetClassifier if train["estimator"] == "classifier" else \
        DaskNeuralNetRegressor
    known = set()
    for base in cls.__mro__:  # skorch's parameters live on NeuralNet.__init__
        if "__init__" in vars(base) and base is not object:
            known |= set(inspect.signature(base.__init__).parameters)
    known -= {"self", "args", "kwargs", "module"}
    prefixes = tuple(f"{p}__" for p in (*cls.prefixes_, "module", "optimizer", "criterion"))
    for key in train:
        if key in _PIPELINE_TRAIN_KEYS or key in known or key.startswith(prefixes):
            continue
        hint = did_you_mean(key, sorted(known | set(_PIPELINE_TRAIN_KEYS)))
        raise PipelineError(path, f"train.{key}", f"unknown estimator parameter{hint} "
                            f"(expected a {cls.__name__} parameter or a routed one such as "
                            "optimizer__momentum)")
    if "module" in train:
        raise PipelineError(path, "train.module", "set the module in model.module")
    for key in ("optimizer", "criterion"):
        if key in train:
            _import_field(train[key], f"train.{key}", path, short_in=_SHORT_NAMES[f"train.{key}"])
    strategy = train.get("strategy")
    if strategy is not None and strategy not in STRATEGIES:
        raise PipelineError(path, "train.strategy", f"expected one of: "
                            f"{', '.join(sorted(STRATEGIES))}; got {strategy!r}")
    options = {k[len("strategy__"):]: v for k, v in train.items() if k.startswith("strategy__")}
    try:  # the strategy's own options (strategy__staleness, ...), checked before any work
        default = inspect.signature(cls.__init__).parameters["strategy"].default
        resolve_strategy(strategy or default, options, sync_every=train.get("sync_every"))
    except ValueError as error:
        where = "train." + next((f"strategy__{k}" for k in options if k in str(error)),
                                "strategy")
        raise PipelineError(path, where, str(error)) from None


def _check_metrics(metrics, path: Path) -> None:
    from sklearn.metrics import get_scorer_names

    names = get_scorer_names()
    for i, name in enumerate(metrics):
        if name not in names:
            raise PipelineError(path, f"evaluate.metrics[{i}]",
                                f"unknown scikit-learn scorer {name!r}"
                                f"{did_you_mean(name, names)}")


def _import_field(name: str, where: str, path: Path, *, short_in: str | None = None):
    try:
        return resolve_import(name, short_in=short_in)
    except ImportError as error:
        raise PipelineError(path, where, f"import path does not resolve: {error}") from None


def _check_call(factory, params: dict, where: str, path: Path, *, partial: bool = False) -> None:
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):
        return
    try:
        (signature.bind_partial if partial else signature.bind)(**params)
    except TypeError as error:
        accepted = [p for p in signature.parameters if p not in ("self", "args", "kwargs")]
        raise PipelineError(path, where, f"{_one_line(error)}; {getattr(factory, '__name__', '')}"
                            f" takes: {', '.join(accepted) or 'no parameters'}") from None


# -- helpers ------------------------------------------------------------------

def _set_dotted(config: dict, key: str, value, path: Path) -> None:
    parts = key.split(".")
    node = config
    for i, part in enumerate(parts[:-1]):
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise PipelineError(path, ".".join(parts[:i + 1]),
                                f"--set {key}: this field is not a section")
    node[parts[-1]] = value


def _one_line(error) -> str:
    return " ".join(str(error).split())
