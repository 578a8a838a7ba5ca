"""Strategies across hosts: accuracy, samples/s and cross-host bytes, with and without a cap.

Two worker hosts of two single-threaded workers each and a scheduler host,
each a network namespace joined to a bridge (:mod:`daskdist.testing.hosts`;
needs root and iproute2). For ``local_sgd``, ``hierarchical`` (groups by
host, on its own) and ``ssp``, the same digits fit (an MLP of about 0.2M
parameters, so that rounds move something) runs with the links uncapped,
capped at 1 Gbit/s and at 100 Mbit/s; each row prints held-out accuracy,
samples/s (the best epoch after the first) as a ratio of the uncapped run,
and the bytes that crossed between hosts per round. Whether the kernel
offers ``netem`` (added latency) is printed too; where it does not, latency
is a parameter of the cost model (``benchmarks/cost_model.py``).

Run: ``python benchmarks/bench_multihost.py [--epochs 6]``.
"""

from __future__ import annotations

import argparse

import numpy as np

RATES = (None, "1gbit", "100mbit")
STRATEGIES = (("local_sgd", {}), ("hierarchical", {}), ("ssp", {"strategy__staleness": 2}))


def _digits():
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    X, y = load_digits(return_X_y=True)
    X = ((X - X.mean(0)) / (X.std(0) + 1e-6)).astype(np.float32)
    return train_test_split(X, y, test_size=0.25, random_state=0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=6)
    args = parser.parse_args()
    from distributed import Client

    from daskdist import MLP, DaskNeuralNetClassifier
    from daskdist.testing.hosts import NamespaceHosts, netem_available, unavailable

    reason = unavailable()
    if reason:
        print(f"namespace hosts cannot be built here: {reason}")
        return
    ok, said = netem_available()
    print(f"netem (added latency): {'available' if ok else 'not available'} ({said})")
    X_train, X_test, y_train, y_test = _digits()
    rows = []
    with NamespaceHosts(worker_hosts=2, workers_per_host=2) as hosts, \
            Client(hosts.scheduler_address, set_as_default=False) as client:
        for strategy, options in STRATEGIES:
            base = None
            for rate in RATES:
                hosts.set_rate(rate)
                before = hosts.counters()
                net = DaskNeuralNetClassifier(
                    MLP, strategy=strategy, max_epochs=args.epochs, lr=0.1, batch_size=64,
                    sync_every=4, optimizer__momentum=0.9, train_split=None, verbose=0,
                    random_state=0, module__n_features=64, module__hidden=(256, 256),
                    scheduler_address=client.scheduler.address, **options)
                net.fit(X_train, y_train)
                moved = hosts.bytes_since(before, hosts.counters())
                cross = sum(moved[h.index] for h in hosts.worker_hosts) / 2
                speed = float(max(net.history[1:, "samples_per_sec"]))
                base = base or speed
                rows.append((strategy, rate or "uncapped", net.score(X_test, y_test), speed,
                             speed / base, cross / len(net.rounds_)))
        hosts.set_rate(None)
    print(f"\n2 hosts x 2 workers, digits, MLP 64-256-256-10, {args.epochs} epochs, "
          "sync_every=4")
    print(f"{'strategy':14} {'links':10} {'accuracy':>8} {'samples/s':>10} {'x uncapped':>10} "
          f"{'MB across hosts/round':>22}")
    for strategy, rate, acc, speed, ratio, per_round in rows:
        print(f"{strategy:14} {rate:10} {acc:8.3f} {speed:10.0f} {ratio:10.2f} "
              f"{per_round / 1e6:22.2f}")


if __name__ == "__main__":
    main()
