"""Pipeline parallelism: what micro-batches buy, side by side in one run.

A model of four wide layers (1024 -> 1024, about 4.2M parameters) cut into
two stages, one per single-threaded worker, trains on 8,192 random samples
with batches of 256. The table prints samples/s of:

- the whole model in one process (plain torch, one thread): the speed of one
  worker holding everything;
- ``strategy="pipeline"`` with 1, 2, 4 and 8 micro-batches per step;
- ``strategy="sync"`` with one replica: the whole model on one worker,
  through the same Dask machinery;

each as a ratio of ``pipeline`` with one micro-batch (the stages then work one
after the other), beside GPipe's bubble ``(S - 1) / (M + S - 1)``, the share
of a step a stage waits, which bounds the speed-up at ``S (1 - bubble)``.
Every row trains the same model from the same start (so their losses agree).

Run: ``python benchmarks/bench_pipeline.py [--epochs 2]``.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from torch import nn

WIDTH, LAYERS, SAMPLES, BATCH = 1024, 4, 16384, 1024


def _module():
    torch.manual_seed(0)
    layers = []
    for _ in range(LAYERS):
        layers += [nn.Linear(WIDTH, WIDTH), nn.Tanh()]
    return nn.Sequential(*layers[:-1], nn.Linear(WIDTH, 10))


def _data():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(SAMPLES, WIDTH)).astype(np.float32)
    return X, X[:, :10].argmax(1).astype(np.int64)


def _plain(X, y, epochs: int) -> float:
    """Samples/s of the whole model in this process, on one thread."""
    torch.set_num_threads(1)
    module = _module()
    optimizer = torch.optim.SGD(module.parameters(), lr=0.01)
    loss_fn = nn.CrossEntropyLoss()
    Xt, yt = torch.from_numpy(X), torch.from_numpy(y)
    t0 = time.perf_counter()
    for _ in range(epochs):
        for start in range(0, SAMPLES, BATCH):
            optimizer.zero_grad()
            loss_fn(module(Xt[start:start + BATCH]), yt[start:start + BATCH]).backward()
            optimizer.step()
    return epochs * SAMPLES / (time.perf_counter() - t0)


def _fit(client, X, y, epochs: int, strategy: str, **options) -> tuple[float, float]:
    """Samples/s of the epochs after the first, and the last epoch's loss."""
    from daskdist import DaskNeuralNetClassifier

    net = DaskNeuralNetClassifier(
        _module(), criterion=nn.CrossEntropyLoss, max_epochs=epochs + 1, lr=0.01,
        batch_size=BATCH, train_split=None, verbose=0, strategy=strategy, n_replicas=1,
        random_state=0, scheduler_address=client.scheduler.address, **options)
    net.fit(X, y)
    seconds = sum(net.history[1:, "dur"])
    return epochs * SAMPLES / seconds, net.history[-1, "train_loss"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=2, help="timed epochs per row")
    args = parser.parse_args()
    from distributed import Client

    from daskdist.clusters.embedded import embedded_cluster

    X, y = _data()
    stages = 2
    rows = [("plain torch, whole model, 1 thread", _plain(X, y, args.epochs), None, None)]
    with embedded_cluster(n_workers=2) as cluster, Client(cluster) as client:
        for m in (1, 2, 4, 8):
            speed, loss = _fit(client, X, y, args.epochs, "pipeline",
                               strategy__n_stages=stages, strategy__n_micro_batches=m)
            rows.append((f"daskdist pipeline, 2 stages, {m} micro-batches", speed, loss,
                         (stages - 1) / (m + stages - 1)))
        speed, loss = _fit(client, X, y, args.epochs, "sync")
        rows.append(("daskdist sync, 1 replica (whole model)", speed, loss, None))
    base = rows[1][1]
    print(f"{'run':48} {'samples/s':>10} {'x 1 micro':>10} {'bubble':>7} {'loss':>8}")
    for name, speed, loss, bubble in rows:
        print(f"{name:48} {speed:10.0f} {speed / base:10.2f} "
              f"{'' if bubble is None else f'{bubble:.2f}':>7} "
              f"{'' if loss is None else f'{loss:.4f}':>8}")
    print(f"model: {LAYERS} x Linear({WIDTH}, {WIDTH}), "
          f"{sum(p.numel() for p in _module().parameters()) / 1e6:.1f}M parameters; "
          f"{SAMPLES} samples, batches of {BATCH}, {args.epochs} timed epochs")


if __name__ == "__main__":
    main()
