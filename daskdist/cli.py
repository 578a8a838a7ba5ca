"""The ``daskdist`` command: run and validate pipelines, render and start clusters.

::

    daskdist run PIPELINE [--cluster SPEC] [--set KEY=VALUE ...] [--output DIR]
                          [--overwrite | --resume] [--workers N] [--quiet] [--keep-open]
    daskdist validate PIPELINE...
    daskdist cluster SPEC [--dry-run]

Exit codes: 0 success, 2 invalid input (a pipeline, a cluster spec, an
argument, a run folder in the way, a missing optional package), 1 a failure
during the run. Errors go to stderr as one line that says what to fix.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

__all__ = ["EXIT_FAILURE", "EXIT_INVALID", "EXIT_OK", "main"]

EXIT_OK, EXIT_FAILURE, EXIT_INVALID = 0, 1, 2
DEFAULT_PIPELINE = "pipelines/digits-mlp.yaml"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="daskdist", description="Train PyTorch models on a Dask cluster from pipeline files.")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="train, evaluate and write a run folder for a pipeline")
    run.add_argument("pipeline", nargs="?", default=DEFAULT_PIPELINE,
                     help=f"pipeline file (default {DEFAULT_PIPELINE})")
    run.add_argument("--cluster", default="local",
                     help="cluster spec: a name in cluster_specs/ or a .yaml path (default local)")
    run.add_argument("--set", dest="overrides", action="append", default=[],
                     metavar="KEY=VALUE", help="override a pipeline field, e.g. "
                     "train.max_epochs=5 (value read as YAML; repeatable)")
    run.add_argument("--output", default=None, help="run folder (default outputs.dir)")
    mode = run.add_mutually_exclusive_group()
    mode.add_argument("--overwrite", action="store_true", default=None,
                      help="replace the outputs of an earlier run in the folder")
    mode.add_argument("--resume", action="store_true",
                      help="continue from the run folder's checkpoint")
    run.add_argument("--workers", type=int, default=None,
                     help="workers to start (overrides the spec's 'workers')")
    run.add_argument("--quiet", action="store_true", help="no progress bar")
    run.add_argument("--keep-open", action="store_true",
                     help="keep the cluster and its /daskdist page up after the run, until "
                     "Ctrl-C")

    validate = sub.add_parser("validate", help="check pipeline files without running them")
    validate.add_argument("pipelines", nargs="+", help="pipeline files")

    cluster = sub.add_parser("cluster", help="start a cluster from a spec, or show what it "
                             "would start")
    cluster.add_argument("spec", help="a name in cluster_specs/ or a .yaml path")
    cluster.add_argument("--dry-run", action="store_true",
                         help="print what would be started (job script, resource, options) "
                         "and start nothing")
    cluster.add_argument("--workers", type=int, default=None,
                         help="workers to start (overrides the spec's 'workers')")
    merge = sub.add_parser("merge-checkpoint", help="write a sharded checkpoint (a file per "
                           "pipeline stage) as one whole checkpoint")
    merge.add_argument("source", help="the sharded checkpoint directory")
    merge.add_argument("target", help="the directory of the whole checkpoint to write")
    return parser


def main(argv=None) -> int:
    """Entry point of the ``daskdist`` console script; returns the exit code."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    from .batch import PipelineError
    from .clusters import ClusterSpecError

    command = {"run": _run, "validate": _validate, "cluster": _cluster,
               "merge-checkpoint": _merge}[args.command]
    try:
        return command(args)
    except (PipelineError, ClusterSpecError) as error:
        return _fail(error, EXIT_INVALID)
    except ImportError as error:  # an optional back end that is not installed
        return _fail(error, EXIT_INVALID)
    except KeyboardInterrupt:
        print("daskdist: interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # noqa: BLE001 - one line on stderr, not a traceback
        logging.getLogger("daskdist").debug("run failed", exc_info=True)
        return _fail(f"{type(error).__name__}: {error}", EXIT_FAILURE)


def _fail(error, code: int) -> int:
    text = " ".join(str(error).split())
    print(f"daskdist: error: {text}", file=sys.stderr)
    return code


def _spec_overrides(args) -> dict:
    return {"workers": args.workers} if args.workers is not None else {}


def _merge(args) -> int:
    from .sharded_checkpoint import merge_checkpoint

    print(f"daskdist: wrote {merge_checkpoint(args.source, args.target)}")
    return EXIT_OK


def _run(args) -> int:
    from .batch import load_pipeline, parse_overrides, run_pipeline
    from .clusters import load_cluster_spec

    pipeline = load_pipeline(args.pipeline, parse_overrides(args.overrides))
    spec = load_cluster_spec(args.cluster, overrides=_spec_overrides(args))
    with spec.connect() as client, client.as_current():
        result = run_pipeline(pipeline, output=args.output, overwrite=args.overwrite,
                              resume=args.resume, cluster_name=spec.name,
                              progress=not args.quiet)
        if args.keep_open:
            print(f"daskdist: the cluster stays up, its run page at "
                  f"{result.estimator.dashboard_link_}; Ctrl-C stops it", flush=True)
            try:
                while True:
                    time.sleep(3600)
            except KeyboardInterrupt:
                pass
    return EXIT_OK


def _validate(args) -> int:
    from .batch import PipelineError, load_pipeline

    failed = 0
    for path in args.pipelines:
        try:
            pipeline = load_pipeline(path)
        except PipelineError as error:
            _fail(error, EXIT_INVALID)
            failed += 1
        else:
            print(f"ok: {path} ({pipeline.name})")
    return EXIT_INVALID if failed else EXIT_OK


def _cluster(args) -> int:
    from .clusters import load_cluster_spec

    spec = load_cluster_spec(args.spec, overrides=_spec_overrides(args))
    if args.dry_run:
        print(spec.dry_run())
        return EXIT_OK
    from . import dashboard

    with spec.connect() as client:
        page = dashboard.install(client)
        print(f"daskdist: cluster {spec.name!r} at {client.scheduler.address}; dashboard at "
              f"{client.dashboard_link}" + (f", training page at {page}" if page else "")
              + "; Ctrl-C stops it", flush=True)
        while True:
            time.sleep(3600)


if __name__ == "__main__":
    sys.exit(main())
