"""Elastic training: workers that join mid-fit, and replicas of mixed speed balanced.

The join: a fit that starts on 2 workers while 2 more join in the middle of it.

Compute is paced by a sleep per sample (``daskdist.testing.PacedNet``,
``--sample-ms`` per sample), not by the machine: with ``local_sgd``,
``sync_every=8`` and a global batch of 64, a round holds 0.5 s of paced
compute per replica on 2 replicas, so the replica count, not the 2-core
machine, sets the speed. An embedded cluster of 2 worker processes; a thread
scales it to 4 halfway through epoch 4 (``cluster.scale(4)``), as adaptive
scaling or a late batch job would.

Printed: samples/s of the epochs before the join and after it, their ratio
(the ideal is 2.0: the global batch is the same, split over twice the
replicas; epoch 1 warms up and epoch 4, when the workers start, is left
out), and, for each worker that joined, the round running when the
scheduler added it, the first round that used it, and the seconds between
(from the scheduler's task stream).

The balance: 4 workers, one of them 3 times slower (``PacedNet``'s
``slow_worker``), digits; ``local_sgd`` against ``local_sgd`` with
``strategy__balance=True``, the same seed and epochs. Printed: samples/s of
the epochs from the third on (balancing starts after the first epoch's
measurement), held-out accuracy, and the median spread of the replicas'
compute per round (slowest over fastest, minus 1).

Run: ``python benchmarks/bench_elastic.py [--scenario join|balance|both]
[--sample-ms 2] [--epochs 7] [--balance-epochs 8] [--balance-sample-ms 4]``.
"""

from __future__ import annotations

import argparse
import re
import threading
import time

import numpy as np

_ROUND = re.compile(r"daskdist-round-[^']*', (\d+), \d+\)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sample-ms", type=float, default=2.0)
    parser.add_argument("--epochs", type=int, default=7)
    parser.add_argument("--samples", type=int, default=4096)
    parser.add_argument("--balance-epochs", type=int, default=8)
    parser.add_argument("--balance-sample-ms", type=float, default=4.0)
    parser.add_argument("--scenario", choices=["join", "balance", "both"], default="both")
    args = parser.parse_args()
    if args.scenario in ("join", "both"):
        join_scenario(args)
    if args.scenario in ("balance", "both"):
        balance_scenario(args)


def join_scenario(args) -> None:
    """2 workers, 2 more joining halfway through epoch 4."""
    from distributed import Client, get_task_stream
    from skorch.callbacks import Callback

    from daskdist import DaskNeuralNetClassifier
    from daskdist.clusters.embedded import embedded_cluster
    from daskdist.testing import PacedNet, make_classification

    X, y = make_classification(args.samples, n_features=20, n_classes=3, seed=0)
    cluster = embedded_cluster(n_workers=2)
    client = Client(cluster, set_as_default=False)
    marks: dict = {"arrived": {}}

    class GrowHalfwayThroughEpoch4(Callback):
        def on_epoch_begin(self, net, **kwargs):
            if len(net.history) == 4 and "timer" not in marks:  # epoch 4 has begun
                half = net.history[-2, "dur"] / 2
                marks["timer"] = threading.Timer(half, grow)
                marks["timer"].start()

    def grow():
        known = set(client.scheduler_info(n_workers=-1)["workers"])
        cluster.scale(4)
        while len(marks["arrived"]) < 2:  # when the scheduler has each new worker
            for address in set(client.scheduler_info(n_workers=-1)["workers"]) - known:
                marks["arrived"].setdefault(address, time.time())
            time.sleep(0.01)

    try:
        net = DaskNeuralNetClassifier(
            PacedNet, module__n_features=20, module__n_outputs=3,
            module__sample_time=args.sample_ms / 1000, max_epochs=args.epochs, lr=0.1,
            batch_size=64, strategy="local_sgd", sync_every=8, train_split=None, verbose=0,
            random_state=0, callbacks=[GrowHalfwayThroughEpoch4()],
            scheduler_address=cluster.scheduler_address)
        with get_task_stream(client) as stream:
            net.fit(X, y)
        marks["timer"].join()
    finally:
        client.close()
        cluster.close()

    # when each round's replica tasks started, by the workers' clocks
    starts: dict = {}
    for task in stream.data:
        match = _ROUND.search(str(task["key"]))
        if match:
            for span in task["startstops"]:
                if span["action"] == "compute":
                    r = int(match.group(1))
                    starts[r] = min(starts.get(r, np.inf), span["start"])
    rounds = net.rounds_
    replicas = net.history[:, "replicas"]
    rates = net.history[:, "samples_per_sec"]
    by_epoch = rounds.groupby("epoch")["n_replicas"]
    whole = [(lo == hi, lo) for lo, hi in zip(by_epoch.min(), by_epoch.max())]
    before = [r for r, (same, n) in zip(rates[1:3], whole[1:3]) if same and n == 2]
    after = [r for r, (same, n) in zip(rates[4:], whole[4:]) if same and n == 4]
    print(f"paced compute per round per replica on 2 replicas: "
          f"{8 * 32 * args.sample_ms / 1000:.2f} s")
    print("epoch  replicas  samples/s  membership")
    for i, (n, rate, h) in enumerate(zip(replicas, rates, net.history), start=1):
        print(f"{i:5d}  {n:8d}  {rate:9.0f}  {h.get('membership', '')}")
    if before and after:
        print(f"samples/s after the join / before: {np.mean(after) / np.mean(before):.2f} "
              f"(target >= 1.8; ideal 2.0)")
    changes = rounds[rounds["membership"] != ""]
    if not starts:
        print("the scheduler's task stream came back empty: no round timings")
        return
    for address, arrived in sorted(marks["arrived"].items(), key=lambda kv: kv[1]):
        running = max((r for r, t in starts.items() if t <= arrived), default=None)
        used = changes[changes["membership"].str.contains(address, regex=False)]
        if used.empty or running is None:
            print(f"{address}: arrived, never used")
            continue
        first = int(used["round"].iloc[0])
        print(f"{address}: added while round {running} ran; first used in round {first}: "
              f"{first - running} rounds later, {starts[first] - arrived:.2f} s "
              f"(target <= 2 rounds)")


def balance_scenario(args) -> None:
    """One worker of four three times slower: unbalanced ``local_sgd`` against ``balance=True``."""
    from distributed import Client
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    from daskdist import DaskNeuralNetClassifier
    from daskdist.clusters.embedded import embedded_cluster
    from daskdist.testing import PacedNet

    X, y = load_digits(return_X_y=True)
    X = (X / 16).astype("float32")
    X_train, X_test, y_train, y_test = train_test_split(X, y, test_size=0.2, random_state=0,
                                                        stratify=y)
    cluster = embedded_cluster(n_workers=4)
    client = Client(cluster, set_as_default=False)
    try:
        slow = sorted(client.scheduler_info(n_workers=-1)["workers"])[-1]
        results = {}
        for balanced in (False, True):
            net = DaskNeuralNetClassifier(
                PacedNet, module__n_features=64, module__hidden=64, module__n_outputs=10,
                module__sample_time=args.balance_sample_ms / 1000, module__slow_worker=slow,
                module__slowdown=3.0, max_epochs=args.balance_epochs, lr=0.2, batch_size=64,
                strategy="local_sgd", sync_every=8, strategy__balance=balanced,
                train_split=None, verbose=0, random_state=0,
                scheduler_address=cluster.scheduler_address).fit(X_train, y_train)
            rates = net.history[:, "samples_per_sec"][2:]  # balanced from epoch 2 on
            rounds = net.rounds_[net.rounds_["epoch"] >= 2]
            spread = [max(c) / min(c) - 1 for c in rounds["replica_compute_s"] if len(c) == 4]
            results[balanced] = (float(np.mean(rates)), net.score(X_test, y_test),
                                 float(np.median(spread)))
    finally:
        client.close()
        cluster.close()
    paced = 8 * 16 * args.balance_sample_ms / 1000
    print(f"\n4 workers, one 3x slower; local_sgd, sync_every=8, global batch 64; "
          f"paced compute per round of a fast replica: {paced:.2f} s")
    print("balance  samples/s  test accuracy  median spread of replica compute per round")
    for balanced, (rate, acc, spread) in results.items():
        print(f"{balanced!s:>7}  {rate:9.0f}  {acc:13.4f}  {spread:.0%}")
    (rate0, acc0, _), (rate1, acc1, spread1) = results[False], results[True]
    print(f"balanced / unbalanced samples/s: {rate1 / rate0:.2f} (target >= 1.5); accuracy "
          f"{100 * (acc1 - acc0):+.1f} points (target within 1); spread {spread1:.0%} "
          f"(target <= 10%)")


if __name__ == "__main__":
    main()
