"""DiLoCo against local_sgd: final loss and accuracy at the same ``sync_every``.

Two tasks, each trained with the inner optimizer the DiLoCo paper pairs with its
outer Nesterov step (AdamW), on an embedded cluster of 2 single-threaded workers,
2 replicas:

- digits: scikit-learn's bundled 8x8 digits, 75% train / 25% test, an MLP with
  one hidden layer of 64, batch 64, ``sync_every=10``, 12 epochs;
- the throughput benchmark's task: a 784-512-256-10 MLP on 60k synthetic
  samples (10k more to test), batch 256, ``sync_every=50``, 3 epochs.

Rows: ``local_sgd`` (AdamW's moments averaged with the parameters every round)
and ``diloco`` with ``outer_lr`` 0.5, 0.7 and 1.0 (outer momentum 0.9,
Nesterov; each replica keeps its own AdamW state), each over 3 seeds. Columns:
the last epoch's training loss and the test accuracy (mean and spread over the
seeds) and the bytes a round moves (median of the steady rounds): ``diloco``
exchanges parameter changes only, ``local_sgd`` parameters and optimizer state.

Run: ``python benchmarks/bench_diloco.py [--seeds 3] [--samples 60000]``.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

ROWS = [("local_sgd", {}),
        ("diloco 0.5", {"strategy__outer_lr": 0.5}),
        ("diloco 0.7", {"strategy__outer_lr": 0.7}),
        ("diloco 1.0", {"strategy__outer_lr": 1.0})]


def _digits():
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    X, y = load_digits(return_X_y=True)
    X = (X / 16).astype(np.float32)
    return train_test_split(X, y, test_size=0.25, random_state=0)


def _synthetic(samples):
    rng = np.random.default_rng(0)
    X = rng.normal(size=(samples + 10_000, 784)).astype(np.float32)
    y = X[:, :10].argmax(1).astype(np.int64)  # the throughput benchmark's task
    return X[:samples], X[samples:], y[:samples], y[samples:]


TASKS = {
    "digits": dict(data=_digits, module__hidden=(64,), batch_size=64, sync_every=10,
                   max_epochs=12, lr=3e-3),
    "benchmark": dict(data=_synthetic, module__hidden=(512, 256), batch_size=256,
                      sync_every=50, max_epochs=3, lr=1e-3),
}


def run_task(client, name, seeds, samples):
    from daskdist import MLP, DaskNeuralNetClassifier

    task = dict(TASKS[name])
    data = task.pop("data")
    X_train, X_test, y_train, y_test = data(samples) if name == "benchmark" else data()
    print(f"\n{name}: {len(X_train)} training samples, sync_every={task['sync_every']}, "
          f"{task['max_epochs']} epochs, AdamW lr {task['lr']}, {seeds} seeds")
    print("strategy | train loss | test accuracy | bytes per round | seconds per fit")
    for label, options in ROWS:
        losses, accuracies, sizes, times = [], [], [], []
        for seed in range(seeds):
            net = DaskNeuralNetClassifier(
                MLP, strategy=label.split()[0], optimizer=torch.optim.AdamW,
                train_split=None, iterator_train__shuffle=True, random_state=seed, verbose=0,
                scheduler_address=client.scheduler.address, **task, **options)
            start = time.perf_counter()
            net.fit(X_train, y_train)
            times.append(time.perf_counter() - start)
            losses.append(net.history[-1, "train_loss"])
            accuracies.append(float((net.predict(X_test) == y_test).mean()))
            steady = net.rounds_[net.rounds_["epoch"] > net.rounds_["epoch"].min()]
            sizes.append(float(np.median(steady["bytes"])))
        print(f"{label} | {np.mean(losses):.4f} ± {np.std(losses):.4f} | "
              f"{np.mean(accuracies):.4f} ± {np.std(accuracies):.4f} | "
              f"{np.median(sizes):,.0f} | {np.mean(times):.1f}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--samples", type=int, default=60_000)
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    args = parser.parse_args(argv)

    from distributed import Client

    from daskdist.clusters.embedded import embedded_cluster

    cluster = embedded_cluster(n_workers=2)
    client = Client(cluster, set_as_default=False)
    try:
        for name in args.tasks:
            run_task(client, name, args.seeds, args.samples)
    finally:
        client.close()
        cluster.close()


if __name__ == "__main__":
    main()
