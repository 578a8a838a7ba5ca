"""What a fit costs before it trains at full speed: fresh process, fresh cluster, fresh array.

Each repeat runs in a new Python process, as a user's script does: it
starts an embedded cluster of 2 single-threaded workers, waits
``--delay`` seconds (0: the fit starts as soon as the cluster is up), makes
the throughput benchmark's data (60k samples, 784 features) and fits the
benchmark MLP with ``local_sgd`` (``sync_every=50``, momentum 0.9) for 3
epochs. It prints, per repeat: the cluster's start time; the first epoch
as a ratio of the mean of the later ones (target <= 1.15); the fit's time
outside its epochs (target < 0.2 s); and the first round's time not spent
computing (``rounds_["sync_s"]`` of round 0), where a worker still busy
with torch's one-time start-up shows (:mod:`daskdist.torch_warmup`).

Run: ``python benchmarks/bench_fit_start.py [--repeats 3] [--delay 0]``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def one(delay: float) -> dict:
    """One fresh cluster and fit in this process; its timings."""
    sys.path.insert(0, HERE)
    import torch
    from bench_throughput import BenchMLP, make_data
    from distributed import Client

    from daskdist import DaskNeuralNetClassifier
    from daskdist.clusters.embedded import embedded_cluster

    t0 = time.perf_counter()
    with embedded_cluster(n_workers=2) as cluster, Client(cluster) as client:
        started = time.perf_counter() - t0
        time.sleep(delay)
        X, y = make_data(60000)
        net = DaskNeuralNetClassifier(
            BenchMLP, criterion=torch.nn.CrossEntropyLoss, max_epochs=3, lr=0.01,
            optimizer__momentum=0.9, batch_size=256, strategy="local_sgd", sync_every=50,
            sharding="sequential", train_split=None, verbose=0, random_state=0,
            scheduler_address=client.scheduler.address)
        t1 = time.perf_counter()
        net.fit(X, y)
        total = time.perf_counter() - t1
    epochs = list(net.history[:, "dur"])
    return {"cluster_start_s": started, "fit_s": total,
            "first_over_steady": epochs[0] / (sum(epochs[1:]) / len(epochs[1:])),
            "outside_epochs_s": total - sum(epochs),
            "first_round_wait_s": float(net.rounds_["sync_s"].iloc[0])}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--delay", type=float, default=0.0,
                        help="seconds between the cluster's start and the fit")
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(one(args.delay)))
        return
    print(f"fresh process, cluster and array per repeat; fit {args.delay:g} s after the "
          "cluster started; local_sgd(50), 3 epochs, 60k samples, 2 workers\n")
    print(f"{'repeat':>6} {'cluster start s':>16} {'first/steady':>13} "
          f"{'outside epochs s':>17} {'round 0 wait s':>15}")
    for i in range(args.repeats):
        out = subprocess.run([sys.executable, __file__, "--one", "--delay", str(args.delay)],
                             capture_output=True, text=True, check=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{i:>6} {r['cluster_start_s']:16.2f} {r['first_over_steady']:13.2f} "
              f"{r['outside_epochs_s']:17.2f} {r['first_round_wait_s']:15.2f}")


if __name__ == "__main__":
    main()
