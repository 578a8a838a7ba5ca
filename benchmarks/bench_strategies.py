"""Synchronisation strategies side by side: sync time, bytes per round, stragglers.

One run prints four tables, every row measured in this run on this machine:

1. Per-round synchronisation time and bytes of each strategy against model size
   (MLPs of about 0.05M, 0.5M and 5M parameters on 1,000 features; 2 replicas).
2. Per-round synchronisation time against the number of replicas (2, 4 and 8
   single-threaded workers on this one machine; the 0.5M model).
3. Bytes per round of ``sync`` and ``local_sgd`` with and without
   compression, and their ratio; and of ``local_sgd`` and ``hierarchical``
   (one group per worker) with four replicas on the two workers.
4. Samples/s of ``sync`` and ``local_sgd`` (each without and with a round
   deadline of 1.5x the running median), ``ssp`` (staleness 2) and ``async``
   with stragglers, as ratios of ``local_sgd`` (and of ``sync`` for
   ``sync`` with a deadline): a persistent straggler (one
   replica's steps always 3x slower) and a transient one (each round, each
   replica is 3x slower with probability 0.3). Here a step's compute is a set
   sleep (:class:`daskdist.testing.StragglerNet`), so that the replicas' speeds
   are the scenario's and not the shared machine's; 4 replicas.

Synchronisation time is a round's span minus its slowest replica's compute
(for ``async`` and ``ssp``: an update's time from its round's start to its
application, minus its compute); the tables give the median over the rounds
after the first epoch. Targets (issue): persistent straggler, ``async`` at
least 1.5x ``local_sgd``; transient straggler, ``ssp`` at least 1.3x
``local_sgd``; ``topk`` at density 0.01 at least 20x fewer bytes per round.

Run: ``python benchmarks/bench_strategies.py [--quick] [--tables 1234]``.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

STRATEGIES = [
    ("sync", {}),
    ("local_sgd", {}),
    ("hierarchical", {}),
    ("ssp", {"strategy__staleness": 2}),
    ("async", {}),
]
#: Hidden width of a one-layer MLP on 1,000 features for each model size.
SIZES = {"0.05M": 50, "0.5M": 500, "5M": 5000}
FEATURES = 1000


def _data(n, features=FEATURES, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, features)).astype(np.float32)
    y = X[:, :10].argmax(1).astype(np.int64)
    return X, y


def _fit(client, strategy, options, X, y, module=None, epochs=2, **params):
    from daskdist import DaskNeuralNetClassifier
    from daskdist.models import MLP

    defaults = dict(max_epochs=epochs, batch_size=128, lr=0.05, sync_every=4, train_split=None,
                    verbose=0, random_state=0, scheduler_address=client.scheduler.address)
    net = DaskNeuralNetClassifier(module or MLP, strategy=strategy,
                                  **{**defaults, **params, **options})
    t0 = time.perf_counter()
    net.fit(X, y)
    return net, time.perf_counter() - t0


def _steady_rounds(net):
    rounds = net.rounds_
    return rounds[rounds["epoch"] > rounds["epoch"].min()] if rounds["epoch"].nunique() > 1 \
        else rounds


def _sync_ms(net) -> float:
    return 1e3 * float(np.median(_steady_rounds(net)["sync_s"]))


def _bytes(net) -> float:
    return float(np.median(_steady_rounds(net)["bytes"]))


def _cluster(n):
    from distributed import Client

    from daskdist.clusters.embedded import embedded_cluster

    cluster = embedded_cluster(n_workers=n)
    return cluster, Client(cluster, set_as_default=False)


def model_sizes(samples):
    print(f"\n1. Per-round sync time (ms, median) and bytes per round, 2 replicas, "
          f"{samples} samples")
    cluster, client = _cluster(2)
    X, y = _data(samples)
    header = ["strategy"] + [f"{s} ms" for s in SIZES] + [f"{s} bytes" for s in SIZES]
    print(" | ".join(header))
    try:
        for strategy, options in STRATEGIES:
            times, sizes = [], []
            for hidden in SIZES.values():
                net, _ = _fit(client, strategy, options, X, y, module__n_features=FEATURES,
                              module__hidden=(hidden,))
                times.append(_sync_ms(net))
                sizes.append(_bytes(net))
            print(" | ".join([strategy] + [f"{t:.1f}" for t in times]
                             + [f"{b:,.0f}" for b in sizes]))
    finally:
        client.close()
        cluster.close()


def replica_counts(samples, counts):
    print(f"\n2. Per-round sync time (ms, median) against replicas, 0.5M parameters, "
          f"{samples} samples")
    print(" | ".join(["strategy"] + [f"{n} replicas" for n in counts]))
    X, y = _data(samples)
    results = {name: [] for name, _ in STRATEGIES}
    for n in counts:
        cluster, client = _cluster(n)
        try:
            for strategy, options in STRATEGIES:
                net, _ = _fit(client, strategy, options, X, y, module__n_features=FEATURES,
                              module__hidden=(SIZES["0.5M"],))
                results[strategy].append(_sync_ms(net))
        finally:
            client.close()
            cluster.close()
    for strategy, times in results.items():
        print(" | ".join([strategy] + [f"{t:.1f}" for t in times]))


def compression(samples):
    print(f"\n3. Bytes per round with and without compression, 0.5M parameters, 2 workers "
          f"(2 replicas, or 4 where marked x4), {samples} samples")
    print("strategy | compression | bytes per round | fewer than none | train loss")
    cluster, client = _cluster(2)
    X, y = _data(samples)
    codecs = [("none", {}), ("fp16", {"strategy__compression": "fp16"}),
              ("bf16", {"strategy__compression": "bf16"}),
              ("topk 0.01", {"strategy__compression": "topk", "strategy__density": 0.01})]
    # four replicas on the two workers: flat averaging against one group per worker
    # (replicas 0 and 2 share a worker, as 1 and 3 do), as hosts of two workers would be
    runs = [("sync", "sync", {}), ("local_sgd", "local_sgd", {}),
            ("local_sgd x4", "local_sgd", {"n_replicas": 4}),
            ("hierarchical x4", "hierarchical",
             {"n_replicas": 4, "strategy__groups": [[0, 2], [1, 3]]})]
    ratios = {}
    try:
        for label, strategy, setup in runs:
            base = None
            for name, options in codecs:
                net, _ = _fit(client, strategy, {**setup, **options}, X, y,
                              module__n_features=FEATURES, module__hidden=(SIZES["0.5M"],))
                size = _bytes(net)
                base = base or size
                ratios[label, name] = base / size
                print(f"{label} | {name} | {size:,.0f} | {base / size:.1f}x | "
                      f"{net.history[-1, 'train_loss']:.3f}")
    finally:
        client.close()
        cluster.close()
    return ratios


#: The straggler table's columns: label, strategy, options.
STRAGGLER_STRATEGIES = [
    ("sync", "sync", {}),
    ("sync+deadline", "sync", {"strategy__deadline": 1.5}),
    ("local_sgd", "local_sgd", {}),
    ("local_sgd+deadline", "local_sgd", {"strategy__deadline": 1.5}),
    ("ssp(2)", "ssp", {"strategy__staleness": 2}),
    ("async", "async", {}),
]


def stragglers(samples, step_time, epochs):
    from daskdist._compat import workers as cluster_workers
    from daskdist.testing import StragglerNet

    print(f"\n4. Samples/s with stragglers (4 replicas, steps of {step_time * 1e3:.0f} ms, "
          f"3x slower on a straggler, sync_every=8, {samples} samples; deadline 1.5x the "
          "running median round)")
    labels = [label for label, *_ in STRAGGLER_STRATEGIES]
    print("scenario | " + " | ".join(labels) + " | async / local_sgd | ssp / local_sgd | "
          "local_sgd+deadline / local_sgd | sync+deadline / sync")
    cluster, client = _cluster(4)
    X, y = _data(samples, features=20)
    try:
        slow = sorted(cluster_workers(client))[0]
        scenarios = [("persistent", {"module__slow_worker": slow}),
                     ("transient", {"module__slow_probability": 0.3})]
        ratios = {}
        for scenario, straggler in scenarios:
            rates = {}
            for label, strategy, options in STRAGGLER_STRATEGIES:
                params = dict(module__n_features=20, module__hidden=16, module__n_outputs=10,
                              module__step_time=step_time, module__slowdown=3.0, sync_every=8,
                              **straggler)
                net, _ = _fit(client, strategy, options, X, y, module=StragglerNet,
                              epochs=epochs, **params)
                rates[label] = float(np.mean(net.history[1:, "samples_per_sec"]))
            ratios[scenario] = {
                "async": rates["async"] / rates["local_sgd"],
                "ssp": rates["ssp(2)"] / rates["local_sgd"],
                "local_sgd+deadline": rates["local_sgd+deadline"] / rates["local_sgd"],
                "sync+deadline": rates["sync+deadline"] / rates["sync"],
            }
            print(f"{scenario} | " + " | ".join(f"{rates[label]:,.0f}" for label in labels)
                  + " | " + " | ".join(f"{r:.2f}x" for r in ratios[scenario].values()))
    finally:
        client.close()
        cluster.close()
    return ratios


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="fewer samples and replica counts (a smoke run)")
    parser.add_argument("--tables", default="1234",
                        help="which tables to run, e.g. 4 for the stragglers alone")
    args = parser.parse_args(argv)
    samples = 1024 if args.quick else 4096
    if "1" in args.tables:
        model_sizes(samples)
    if "2" in args.tables:
        replica_counts(samples // 2, [2, 4] if args.quick else [2, 4, 8])
    if "3" in args.tables:
        packed = compression(samples)
        print("\ntarget: topk 0.01 >= 20x fewer bytes per round: "
              f"sync {packed['sync', 'topk 0.01']:.1f}, "
              f"local_sgd {packed['local_sgd', 'topk 0.01']:.1f}")
    if "4" in args.tables:
        slow = stragglers(2048 if args.quick else 4096, 0.02, 2 if args.quick else 3)
        print("\ntargets: persistent straggler, async >= 1.5x local_sgd: "
              f"{slow['persistent']['async']:.2f}; transient straggler, ssp >= 1.3x local_sgd: "
              f"{slow['transient']['ssp']:.2f}")


if __name__ == "__main__":
    main()
