"""The GPU check: CUDA against CPU, and daskdist against a plain single-GPU loop.

Prints, on one machine with one GPU (a few minutes):

1. ``sync`` on the GPU against ``sync`` on the CPU: the same fit (digits, an
   MLP, two replicas on two workers, 3 epochs), the largest difference of the
   trained parameters and whether it is within tolerance (1e-4).
2. Samples/s of a plain torch training loop on the GPU (batches copied from
   pinned host memory, as daskdist does) and of daskdist training the same
   model on one worker holding the GPU, with ``ddp`` (one rank: one task per
   epoch) and ``local_sgd`` (``sync_every=100``), in float32 and bf16, as
   ratios of the plain loop (target: at least 0.9x).

Run through ``benchmarks/gpu_check.sh`` (which bounds it to 5 minutes), or
``python benchmarks/gpu_check.py --device cpu`` to try it without a GPU.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import torch
from torch import nn

HIDDEN = (512, 256)


def _module(n_features: int, hidden=HIDDEN, n_outputs: int = 10) -> nn.Module:
    from daskdist.models import MLP

    torch.manual_seed(0)
    return MLP(n_features, hidden=hidden, n_outputs=n_outputs, output="linear")


def _net(client, device, module, **kwargs):
    from daskdist import DaskNeuralNetClassifier

    params = dict(criterion=nn.CrossEntropyLoss, lr=0.05, train_split=None, verbose=0,
                  random_state=0, device=device, scheduler_address=client.scheduler.address)
    return DaskNeuralNetClassifier(module, **{**params, **kwargs})


def equivalence(device: str) -> bool:
    """``sync`` on ``device`` against ``sync`` on the CPU; print and return whether they agree."""
    from distributed import Client
    from sklearn.datasets import load_digits

    from daskdist.clusters.embedded import embedded_cluster
    from daskdist.state import params_vector

    X, y = load_digits(return_X_y=True)
    X = ((X - X.mean(0)) / (X.std(0) + 1e-6)).astype(np.float32)
    fits = {}
    with embedded_cluster(n_workers=2) as cluster, Client(cluster) as client:
        for where in ("cpu", device):
            net = _net(client, where, _module(64, (64,)), strategy="sync", max_epochs=3,
                       batch_size=128, optimizer__momentum=0.9)
            fits[where] = (params_vector(net.fit(X, y).module_), net.score(X, y))
    diff = float(np.abs(fits[device][0] - fits["cpu"][0]).max())
    ok = diff <= 1e-4
    print(f"1. sync on {device} vs on cpu (digits, 2 replicas, 3 epochs): largest parameter "
          f"difference {diff:.2e} (tolerance 1e-4): {'PASS' if ok else 'FAIL'}; accuracy "
          f"{fits[device][1]:.3f} vs {fits['cpu'][1]:.3f}")
    return ok


def _plain(X, y, device: str, batch: int, epochs: int, precision) -> float:
    """Samples/s of the steady epochs of a plain loop on ``device``."""
    if device == "cpu":
        torch.set_num_threads(1)  # (as a daskdist worker trains, one thread)
    module = _module(X.shape[1]).to(device)
    optimizer = torch.optim.SGD(module.parameters(), lr=0.05)
    loss_fn = nn.CrossEntropyLoss()
    Xt, yt = torch.from_numpy(X), torch.from_numpy(y)
    if device != "cpu":
        Xt, yt = Xt.pin_memory(), yt.pin_memory()
    dtype = {"bf16": torch.bfloat16}.get(precision)
    times = []
    for _ in range(epochs):
        _sync(device)
        t0 = time.perf_counter()
        for start in range(0, len(X), batch):
            xb = Xt[start:start + batch].to(device, non_blocking=True)
            yb = yt[start:start + batch].to(device, non_blocking=True)
            optimizer.zero_grad()
            with torch.autocast(torch.device(device).type, dtype=dtype,
                                enabled=dtype is not None):
                loss = loss_fn(module(xb), yb)
            loss.backward()
            optimizer.step()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return len(X) / min(times[1:])


def _sync(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def throughput(device: str, samples: int, epochs: int, batch: int) -> list:
    """Rows of (run, samples/s, ratio to the plain loop of the same precision)."""
    from distributed import Client

    from daskdist.clusters.embedded import embedded_cluster

    rng = np.random.default_rng(0)
    X = rng.normal(size=(samples, 784)).astype(np.float32)
    y = X[:, :10].argmax(1).astype(np.int64)
    rows = []
    with embedded_cluster(n_workers=1) as cluster, Client(cluster) as client:
        for precision in (None, "bf16"):
            plain = _plain(X, y, device, batch, epochs, precision)
            label = precision or "fp32"
            rows.append((f"plain torch loop, {label}", plain, 1.0))
            for strategy, options in (("ddp", {}), ("local_sgd", {"sync_every": 100})):
                net = _net(client, device, _module(784), strategy=strategy, max_epochs=epochs,
                           batch_size=batch, n_replicas=1, precision=precision, **options)
                net.fit(X, y)
                speed = samples / min(net.history[1:, "dur"])
                rows.append((f"daskdist {strategy}, 1 worker, {label}", speed, speed / plain))
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--samples", type=int, default=60000)
    parser.add_argument("--epochs", type=int, default=3, help="epochs per run (first: warm-up)")
    parser.add_argument("--batch-size", type=int, default=512)
    args = parser.parse_args()
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        print(f"no CUDA device here (torch {torch.__version__}, built for CUDA "
              f"{torch.version.cuda}): nothing to check. Install a CUDA build of torch, or "
              "pass --device cpu to try the script.")
        return 2
    name = (torch.cuda.get_device_name() if torch.device(args.device).type == "cuda"
            else "CPU")
    print(f"device: {args.device} ({name}), torch {torch.__version__}")
    ok = equivalence(args.device)
    rows = throughput(args.device, args.samples, args.epochs, args.batch_size)
    print(f"2. samples/s, 784-512-256-10 MLP, {args.samples} samples, batches of "
          f"{args.batch_size}, best of {args.epochs - 1} steady epochs (target: >= 0.9x plain)")
    print(f"{'run':40} {'samples/s':>10} {'x plain':>8}")
    for run, speed, ratio in rows:
        print(f"{run:40} {speed:10.0f} {ratio:8.2f}")
    best = max(ratio for run, _, ratio in rows if "daskdist" in run and "fp32" in run)
    print(f"target daskdist >= 0.9x plain (fp32, best strategy): {best:.2f} "
          f"{'PASS' if best >= 0.9 else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
