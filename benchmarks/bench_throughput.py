"""Training throughput of daskdist against plain torch, independent processes and DDP.

One run measures, on the same task and machine, side by side:

- a plain single-process torch loop with 1 and with 2 threads;
- two independent single-threaded processes that never communicate (the ceiling
  for two replicas);
- torch DistributedDataParallel with gloo on 2 processes;
- daskdist ``ddp``, ``sync``, ``local_sgd`` (``sync_every`` 10 and 50) and
  ``diloco`` (``sync_every=50``), and ``local_sgd`` and ``diloco`` with
  ``strategy__overlap=True``, through the estimator, on an embedded cluster
  of 2 single-threaded workers (``ddp`` overlaps its allreduce with the
  backward pass: it has no separate synchronisation time per round);

and prints samples/s, each as a ratio of the ceiling and of DDP, plus daskdist's
visible synchronisation time per round (while no replica trains). The task: a
784-512-256-10 MLP (~0.5M parameters), 60k synthetic samples, 128 samples per
replica per step (``batch_size=256`` over 2 replicas), SGD with momentum 0.9
(what users run; its state doubles what ``local_sgd`` averages). The first
epoch is warm-up. All rows are measured in turn, and the whole sequence is
repeated (``--repeats``), so that a slow spell of a shared machine does not
fall on one row only. Each row reports the mean of its steady epochs' rates
(ratios use it) and the best of them, and its end-to-end rate: samples trained
over the wall time of the whole run, the first epoch and set-up included (the
whole ``fit()`` call for daskdist; for plain torch, the independent processes
and DDP, each process's own time from building the model to its last step).

Run: ``python benchmarks/bench_throughput.py [--epochs 3] [--repeats 2] [--samples 60000]``.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import torch
import torch.multiprocessing as mp

PER_REPLICA = 128
REPLICAS = 2
MOMENTUM = 0.9


def make_model():
    return torch.nn.Sequential(
        torch.nn.Linear(784, 512), torch.nn.ReLU(),
        torch.nn.Linear(512, 256), torch.nn.ReLU(),
        torch.nn.Linear(256, 10),
    )


def make_data(n, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, 784)).astype(np.float32)
    y = (X[:, :10].argmax(1)).astype(np.int64)
    return X, y


def _plain_epochs(X, y, batch, epochs, threads, model=None, start=None):
    """Plain torch loop; the wall time of each epoch, and of the whole run from ``start``."""
    start = time.perf_counter() if start is None else start
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = model or make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=MOMENTUM)
    loss_fn = torch.nn.CrossEntropyLoss()
    Xt, yt = torch.from_numpy(X), torch.from_numpy(y)
    times = []
    for _ in range(epochs):
        t0 = time.perf_counter()
        for first in range(0, len(Xt), batch):
            opt.zero_grad()
            loss_fn(model(Xt[first:first + batch]), yt[first:first + batch]).backward()
            opt.step()
        times.append(time.perf_counter() - t0)
    return times, time.perf_counter() - start


def _steady(samples_per_epoch, times):
    """Samples/s of each epoch after the first (the warm-up)."""
    steady = times[1:] or times
    return [samples_per_epoch / t for t in steady]


def _rates(samples_per_epoch, run):
    """``(steady epoch rates, end-to-end rate)`` of ``(epoch times, total time)``."""
    times, total = run
    return _steady(samples_per_epoch, times), samples_per_epoch * len(times) / total


def _independent_worker(rank, n, epochs, queue):
    X, y = make_data(n, seed=rank)
    queue.put(_plain_epochs(X, y, PER_REPLICA, epochs, threads=1))  # from the model's build


def run_independent(n_total, epochs):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_independent_worker, args=(r, n_total // REPLICAS, epochs, queue))
             for r in range(REPLICAS)]
    for p in procs:
        p.start()
    results = [queue.get() for _ in procs]
    for p in procs:
        p.join()
    # both processes run at once: an epoch (and the run) lasts as long as the slower one
    times = [max(t) for t in zip(*(r[0] for r in results))]
    return _rates(n_total, (times, max(r[1] for r in results)))


def _ddp_worker(rank, port, n, epochs, queue):
    import torch.distributed as dist

    start = time.perf_counter()
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=REPLICAS)
    torch.manual_seed(0)
    model = torch.nn.parallel.DistributedDataParallel(make_model())
    begin_data = time.perf_counter()
    X, y = make_data(n, seed=rank)
    start += time.perf_counter() - begin_data  # generating the data is not the run's work
    run = _plain_epochs(X, y, PER_REPLICA, epochs, threads=1, model=model, start=start)
    if rank == 0:
        queue.put(run)
    dist.destroy_process_group()


def run_ddp(n_total, epochs):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_ddp_worker, args=(r, port, n_total // REPLICAS, epochs, queue))
             for r in range(REPLICAS)]
    for p in procs:
        p.start()
    run = queue.get()
    for p in procs:
        p.join()
    return _rates(n_total, run)


class BenchMLP(torch.nn.Module):
    """The benchmark MLP with a linear output, for ``CrossEntropyLoss``."""

    def __init__(self):
        super().__init__()
        self.net = make_model()

    def forward(self, X):
        return self.net(X)


def run_daskdist(client, X, y, epochs, strategy, sync_every=None, **options):
    from daskdist import DaskNeuralNetClassifier

    net = DaskNeuralNetClassifier(
        BenchMLP, criterion=torch.nn.CrossEntropyLoss, max_epochs=epochs, lr=0.01,
        optimizer__momentum=MOMENTUM,
        batch_size=PER_REPLICA * REPLICAS, strategy=strategy, sync_every=sync_every or 1,
        sharding="sequential", train_split=None, verbose=0, random_state=0,
        scheduler_address=client.scheduler.address, **options,
    )
    start = time.perf_counter()
    net.fit(X, y)
    total = time.perf_counter() - start
    rates = net.history[:, "samples_per_sec"]
    steady = rates[1:] or rates
    rounds = net.rounds_[net.rounds_["epoch"] > 0]
    return {
        "samples_per_sec": [float(r) for r in steady],
        "end_to_end": len(X) * epochs / total,
        "sync_ms": float(rounds["sync_s"].median() * 1e3),
        "compute_ms": float(rounds["compute_s"].median() * 1e3),
        "mb_per_round": float(rounds["bytes"].median() / 1e6),
    }


def _measure_all(X, y, epochs, results, details):
    """One pass over every row; appends each row's steady-state epoch rates."""
    from distributed import Client

    from daskdist.clusters.embedded import embedded_cluster

    n = len(X)

    def add(label, rates, end_to_end):
        results.setdefault(label, []).extend(rates)
        details.setdefault(label, {}).setdefault("end_to_end", []).append(end_to_end)

    add("plain torch, 1 thread", *_rates(n, _plain_epochs(X, y, 256, epochs, threads=1)))
    add("plain torch, 2 threads", *_rates(n, _plain_epochs(X, y, 256, epochs, threads=2)))
    add("2 independent processes (ceiling)", *run_independent(n, epochs))
    add("torch DDP, gloo, 2 processes", *run_ddp(n, epochs))
    # the cluster lives only while its rows run, so it never loads the others
    with embedded_cluster(n_workers=REPLICAS) as cluster, Client(cluster) as client:
        overlap = {"strategy__overlap": True}
        for label, strategy, k, options in [
                ("daskdist ddp", "ddp", None, {}),
                ("daskdist sync", "sync", None, {}),
                ("daskdist local_sgd, sync_every=10", "local_sgd", 10, {}),
                ("daskdist local_sgd, sync_every=50", "local_sgd", 50, {}),
                ("daskdist local_sgd(50), overlap", "local_sgd", 50, overlap),
                ("daskdist diloco, sync_every=50", "diloco", 50, {}),
                ("daskdist diloco(50), overlap", "diloco", 50, overlap)]:
            run = run_daskdist(client, X, y, epochs, strategy, k, **options)
            add(label, run.pop("samples_per_sec"), run.pop("end_to_end"))
            for key, value in run.items():
                details.setdefault(label, {}).setdefault(key, []).append(value)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3,
                        help="epochs per fit, the first warm-up (default 3)")
    parser.add_argument("--samples", type=int, default=60000)
    parser.add_argument("--repeats", type=int, default=2,
                        help="passes over all rows, interleaved (default 2)")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)
    n, epochs = args.samples, args.epochs
    X, y = make_data(n)

    rates, details = {}, {}
    for _ in range(args.repeats):
        _measure_all(X, y, epochs, rates, details)
    results = {label: (float(np.mean(r)), float(np.max(r))) for label, r in rates.items()}
    details = {label: {k: float(np.median(v)) for k, v in d.items()}
               for label, d in details.items()}

    ceiling = results["2 independent processes (ceiling)"][0]
    ddp = results["torch DDP, gloo, 2 processes"][0]
    ceiling_e2e = details["2 independent processes (ceiling)"]["end_to_end"]
    print(f"\n{n} samples, {epochs} epochs (the first is warm-up) x {args.repeats} interleaved "
          f"passes, {PER_REPLICA} samples per replica per step, 784-512-256-10 MLP, SGD "
          f"momentum {MOMENTUM}, torch {torch.__version__}, {os.cpu_count()} cores\n")
    print(f"{'run':<38} {'mean/s':>8} {'best/s':>8} {'x ceiling':>10} {'x DDP':>7} "
          f"{'end-to-end/s':>13} {'x ceiling':>10} {'sync ms/round':>14}")
    for label, (mean, best) in results.items():
        d = details.get(label, {})
        sync = d.get("sync_ms")
        sync_txt = f"{sync:14.1f}" if sync is not None and np.isfinite(sync) else f"{'':>14}"
        e2e = d["end_to_end"]
        print(f"{label:<38} {mean:8.0f} {best:8.0f} {mean / ceiling:10.2f} {mean / ddp:7.2f} "
              f"{e2e:13.0f} {e2e / ceiling_e2e:10.2f} {sync_txt}")
    local50 = results["daskdist local_sgd, sync_every=50"][0]
    local50_e2e = details["daskdist local_sgd, sync_every=50"]["end_to_end"]
    over = results["daskdist local_sgd(50), overlap"][0]
    over_e2e = details["daskdist local_sgd(50), overlap"]["end_to_end"]
    visible = (details["daskdist local_sgd(50), overlap"]["sync_ms"]
               / details["daskdist local_sgd, sync_every=50"]["sync_ms"])
    print(f"\ntargets (means of steady epochs; end to end over the whole {epochs}-epoch fit):\n"
          f"  local_sgd(50) end to end >= 0.78x ceiling: {local50_e2e / ceiling_e2e:.2f} "
          f"(steady {local50 / ceiling:.2f})\n"
          f"  local_sgd(50) overlap steady >= 0.85x ceiling: {over / ceiling:.2f}; visible sync "
          f"<= 0.25x non-overlapped: {visible:.2f}; end to end >= 0.82x: "
          f"{over_e2e / ceiling_e2e:.2f}\n"
          f"  sync >= 0.4x DDP: {results['daskdist sync'][0] / ddp:.2f}; ddp >= 0.95x DDP: "
          f"{results['daskdist ddp'][0] / ddp:.2f}")
    for label, d in details.items():
        if "compute_ms" in d:
            print(f"{label}: compute {d['compute_ms']:.1f} ms/round, "
                  f"{d['mb_per_round']:.1f} MB moved/round")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"samples_per_sec": results, "daskdist": details}, f, indent=2)


if __name__ == "__main__":
    main()
