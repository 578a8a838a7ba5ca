"""Training throughput from a Zarr store on disk against the same data in memory.

The same model, strategy and cluster train on the same samples three times
per repeat: from a numpy array in the client (shards scattered to the
workers); from a Zarr store opened lazily with xarray, each worker reading its
own whole chunks once and keeping them as its shard; and from the same store
streamed (``streaming=True``, for data larger than worker memory), each
replica reading its chunks again every epoch while it trains, shuffled in a
buffer of ``--buffer-chunks`` chunks. The rows alternate, and the sequence is
repeated (``--repeats``), so a slow spell of a shared machine does not fall on
one row only. The store is freshly written, so its files are likely in the
operating system's page cache: reads cost decompression more than disk.

Printed: steady-epoch samples/s (mean and best; the first epoch, which builds
the shards, is reported apart as set-up) and the ratios Zarr/numpy of the best
epochs — the target is at least 0.8.

Run: ``python benchmarks/bench_zarr.py [--samples 60000] [--epochs 4] [--repeats 2]
[--buffer-chunks 4]``.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from bench_throughput import PER_REPLICA, REPLICAS, BenchMLP, make_data


def _fit(client, X, y, epochs, **params):
    from daskdist import DaskNeuralNetClassifier

    net = DaskNeuralNetClassifier(
        BenchMLP, criterion=torch.nn.CrossEntropyLoss, max_epochs=epochs, lr=0.01,
        batch_size=PER_REPLICA * REPLICAS, strategy="local_sgd", sync_every=50,
        sharding="sequential", train_split=None, verbose=0, random_state=0,
        scheduler_address=client.scheduler.address, **params,
    )
    t0 = time.perf_counter()
    net.fit(X, y)
    total = time.perf_counter() - t0
    rates = list(net.history[:, "samples_per_sec"])
    return {"first_epoch_s": float(net.history[0, "dur"]), "total_s": total,
            "steady": [float(r) for r in rates[1:]] or [float(rates[0])]}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=60000)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--chunk", type=int, default=5000, help="samples per Zarr chunk")
    parser.add_argument("--buffer-chunks", type=int, default=4,
                        help="chunks a streaming replica shuffles together")
    args = parser.parse_args(argv)

    import xarray as xr
    from distributed import Client

    from daskdist import embedded_cluster
    from daskdist.datasets import write_zarr

    X, y = make_data(args.samples)
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "bench.zarr"
        data = xr.Dataset({"X": (("sample", "pixel"), X), "y": ("sample", y)})
        write_zarr(data.chunk({"sample": args.chunk}), store)
        size_mb = sum(f.stat().st_size for f in store.rglob("*") if f.is_file()) / 1e6
        cluster = embedded_cluster(n_workers=REPLICAS)
        numpy, kept, streamed = ("numpy (in client memory)", "zarr (read once, kept)",
                                 "zarr (streamed, shuffled)")
        rows = {numpy: [], kept: [], streamed: []}
        with Client(cluster) as client:
            for _ in range(args.repeats):
                rows[numpy].append(_fit(client, X, y, args.epochs))
                opened = xr.open_zarr(store)
                rows[kept].append(_fit(client, opened["X"].data, opened["y"].data,
                                       args.epochs, streaming=False))
                rows[streamed].append(_fit(
                    client, opened["X"].data, opened["y"].data, args.epochs, streaming=True,
                    buffer_chunks=args.buffer_chunks, iterator_train__shuffle=True))
        cluster.close()

    print(f"{args.samples} samples x 784 float32 ({size_mb:.0f} MB in Zarr, chunks of "
          f"{args.chunk}), {args.epochs} epochs x {args.repeats} repeats, local_sgd(50), "
          f"{REPLICAS} workers, streaming buffer of {args.buffer_chunks} chunks, "
          f"torch {torch.__version__}\n")
    print(f"{'input':30} {'mean/s':>8} {'best/s':>8} {'first epoch s':>14}")
    best = {}
    for name, runs in rows.items():
        steady = [r for run in runs for r in run["steady"]]
        first = np.mean([run["first_epoch_s"] for run in runs])
        best[name] = max(steady)
        print(f"{name:30} {np.mean(steady):8.0f} {max(steady):8.0f} {first:14.2f}")
    print("\ntarget: zarr >= 0.8x numpy (best epochs):")
    for name in (kept, streamed):
        print(f"  {name:28} {best[name] / best[numpy]:.2f}")


if __name__ == "__main__":
    main()
