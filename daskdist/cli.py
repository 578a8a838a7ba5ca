"""The ``daskdist`` command.

``daskdist run`` trains the default job — a small network on scikit-learn's
bundled digits — on an embedded local cluster (or ``--scheduler``), then prints
test accuracy, throughput and where the dashboard was.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

__all__ = ["main", "run_digits"]


def run_digits(*, strategy: str = "local_sgd", sync_every: int = 4, epochs: int = 30,
               n_workers: int | None = None, scheduler: str | None = None,
               seed: int = 0, out=sys.stdout) -> dict:
    """Train an MLP on digits with daskdist and report how it went.

    Returns
    -------
    dict
        ``accuracy``, ``samples_per_sec``, ``dashboard`` and ``seconds``.
    """
    import numpy as np
    import torch
    from distributed import Client
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    from sklearn.preprocessing import StandardScaler

    from .clients import embedded_cluster
    from .estimators import DaskNeuralNetClassifier
    from .models import MLP

    t0 = time.perf_counter()
    X, y = load_digits(return_X_y=True)
    X = X.astype(np.float32)
    X_train, X_test, y_train, y_test = train_test_split(
        X, y, test_size=0.2, stratify=y, random_state=seed)
    scaler = StandardScaler().fit(X_train)
    cluster = None if scheduler else embedded_cluster(n_workers=n_workers)
    with Client(scheduler or cluster) as client:
        dashboard = client.dashboard_link
        print(f"daskdist: {len(client.scheduler_info(n_workers=-1)['workers'])} workers, "
              f"dashboard at {dashboard}", file=out)
        torch.manual_seed(seed)
        net = DaskNeuralNetClassifier(
            MLP, module__hidden=(128,), max_epochs=epochs, lr=0.05, batch_size=64,
            optimizer=torch.optim.SGD, optimizer__momentum=0.9,
            strategy=strategy, sync_every=sync_every, sharding="stratified",
            iterator_train__shuffle=True, preprocessor=scaler, random_state=seed,
            verbose=0,
        )
        net.fit(X_train, y_train)
        accuracy = float((net.predict(X_test) == y_test).mean())
    if cluster is not None:
        cluster.close()
    history = net.history
    result = {
        "accuracy": accuracy,
        "samples_per_sec": float(np.mean(history[:, "samples_per_sec"])),
        "valid_acc": float(history[-1, "valid_acc"]),
        "rounds": int(sum(history[:, "rounds"])),
        "dashboard": dashboard,
        "seconds": time.perf_counter() - t0,
    }
    print(f"digits: {epochs} epochs, strategy={strategy}, {result['rounds']} rounds", file=out)
    print(f"test accuracy: {accuracy:.4f}  (hold-out during training: "
          f"{result['valid_acc']:.4f})", file=out)
    print(f"throughput: {result['samples_per_sec']:.0f} samples/s", file=out)
    print(f"dashboard was at: {dashboard}", file=out)
    print(f"total time: {result['seconds']:.1f} s", file=out)
    return result


def main(argv=None) -> int:
    """Entry point of the ``daskdist`` console script."""
    parser = argparse.ArgumentParser(prog="daskdist", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="train the default job (digits) on a Dask cluster")
    run.add_argument("--strategy", default="local_sgd", help="sync or local_sgd")
    run.add_argument("--sync-every", type=int, default=4, help="local steps per round")
    run.add_argument("--epochs", type=int, default=30)
    run.add_argument("--workers", type=int, default=None,
                     help="workers of the embedded cluster (default: one per core)")
    run.add_argument("--scheduler", default=None, help="address of a running scheduler")
    run.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.command == "run":
        run_digits(strategy=args.strategy, sync_every=args.sync_every, epochs=args.epochs,
                   n_workers=args.workers, scheduler=args.scheduler, seed=args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
