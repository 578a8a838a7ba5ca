"""Elastic training: a fit that starts on 2 workers while 2 more join in the middle of it.

Compute is paced by a sleep per sample (``daskdist.testing.PacedNet``,
``--sample-ms`` per sample), not by the machine: with ``local_sgd``,
``sync_every=8`` and a global batch of 64, a round holds 0.5 s of paced
compute per replica on 2 replicas, so the replica count, not the 2-core
machine, sets the speed. An embedded cluster of 2 worker processes; a thread
scales it to 4 halfway through epoch 2 (``cluster.scale(4)``), as adaptive
scaling or a late batch job would.

Printed: samples/s of the epochs before the join and after it, their ratio
(the ideal is 2.0: the global batch is the same, split over twice the
replicas), and how many rounds passed between the new workers' arrival and
the first round that used them (changes take effect at the next epoch
boundary, so about the rest of that epoch).

Run: ``python benchmarks/bench_elastic.py [--sample-ms 2] [--epochs 6]``.
"""

from __future__ import annotations

import argparse
import threading
import time

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sample-ms", type=float, default=2.0)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--samples", type=int, default=4096)
    args = parser.parse_args()

    from distributed import Client
    from skorch.callbacks import Callback

    from daskdist import DaskNeuralNetClassifier
    from daskdist.clusters.embedded import embedded_cluster
    from daskdist.testing import PacedNet, make_classification

    X, y = make_classification(args.samples, n_features=20, n_classes=3, seed=0)
    cluster = embedded_cluster(n_workers=2)
    client = Client(cluster, set_as_default=False)
    marks: dict = {"epoch_ends": []}

    class Timeline(Callback):
        def on_epoch_begin(self, net, **kwargs):
            if len(net.history) == 1 and "timer" not in marks:  # epoch 2 begins
                half = net.history[-1, "dur"] / 2
                marks["timer"] = threading.Timer(half, grow)
                marks["timer"].start()

        def on_epoch_end(self, net, **kwargs):
            marks["epoch_ends"].append(time.perf_counter())

    def grow():
        cluster.scale(4)
        client.wait_for_workers(4, timeout=120)
        marks["arrived"] = time.perf_counter()

    try:
        net = DaskNeuralNetClassifier(
            PacedNet, module__n_features=20, module__n_outputs=3,
            module__sample_time=args.sample_ms / 1000, max_epochs=args.epochs, lr=0.1,
            batch_size=64, strategy="local_sgd", sync_every=8, train_split=None, verbose=0,
            random_state=0, callbacks=[Timeline()], scheduler_address=cluster.scheduler_address)
        net.fit(X, y)
        marks["timer"].join()
    finally:
        client.close()
        cluster.close()

    replicas = net.history[:, "replicas"]
    rates = net.history[:, "samples_per_sec"]
    before = [r for r, n in zip(rates[1:], replicas[1:]) if n == 2]  # epoch 1 warms up
    after = [r for r, n in zip(rates, replicas) if n == 4]
    rounds = net.rounds_
    per_epoch = rounds.groupby("epoch").size().tolist()
    first_new = int(rounds.index[rounds["n_replicas"] == 4][0]) if after else None
    ends = np.array(marks["epoch_ends"])
    arrived_in = int(np.searchsorted(ends, marks["arrived"]))  # the epoch it arrived in
    start = ends[arrived_in - 1] if arrived_in else None
    left = (ends[arrived_in] - marks["arrived"]) / (ends[arrived_in] - start)
    waited = left * per_epoch[arrived_in]
    print(f"paced compute per round per replica on 2 replicas: "
          f"{8 * 32 * args.sample_ms / 1000:.2f} s")
    print("epoch  replicas  samples/s  membership")
    history_membership = [h.get("membership", "") for h in net.history]
    for i, (n, rate, text) in enumerate(zip(replicas, rates, history_membership), start=1):
        print(f"{i:5d}  {n:8d}  {rate:9.0f}  {text}")
    if before and after:
        print(f"samples/s after the join / before: {np.mean(after) / np.mean(before):.2f} "
              f"(target >= 1.8; ideal 2.0)")
    print(f"workers arrived {left:.0%} of the way before the end of epoch {arrived_in + 1}: "
          f"about {waited:.1f} rounds passed before the first round with 4 replicas "
          f"(round {first_new}; target <= 2 rounds, met only when changes take effect "
          f"at the next round)")


if __name__ == "__main__":
    main()
