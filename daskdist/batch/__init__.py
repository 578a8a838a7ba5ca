"""Batch pipelines: a YAML file says what to train, ``daskdist run`` trains it.

See ``pipelines/`` for examples and ``pipeline-schema.yaml`` beside this module
for every field. :func:`load_pipeline` validates a file before anything
starts; :func:`run_pipeline` trains, evaluates and writes the run folder.
"""

from .data import PipelineData, load_data, split_data
from .load import Pipeline, PipelineError, load_pipeline, parse_overrides, resolve_import
from .outputs import RunFolderError
from .run import RunResult, build_estimator, run_pipeline

__all__ = [
    "Pipeline",
    "PipelineData",
    "PipelineError",
    "RunFolderError",
    "RunResult",
    "build_estimator",
    "load_data",
    "load_pipeline",
    "parse_overrides",
    "resolve_import",
    "run_pipeline",
    "split_data",
]
