"""Elastic training: a fit that starts on 2 workers while 2 more join in the middle of it.

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

Run: ``python benchmarks/bench_elastic.py [--sample-ms 2] [--epochs 7]``.
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
    args = parser.parse_args()

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


if __name__ == "__main__":
    main()
