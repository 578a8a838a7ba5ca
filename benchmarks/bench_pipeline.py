"""Pipeline parallelism: what micro-batches buy, side by side in one run.

A model of four wide layers (1024 -> 1024, about 4.2M parameters) cut into
two stages, one per single-threaded worker, trains on 8,192 random samples
with batches of 256. The table prints samples/s of:

- the whole model in one process (plain torch, one thread): the speed of one
  worker holding everything;
- ``strategy="pipeline"`` with 1, 2, 4 and 8 micro-batches per step, under
  GPipe's schedule and under 1F1B (``strategy__schedule="1f1b"``);
- ``strategy="sync"`` with one replica: the whole model on one worker,
  through the same Dask machinery;

each as a ratio of ``pipeline`` with one micro-batch (the stages then work one
after the other), beside the bubble ``(S - 1) / (M + S - 1)``, the share
of a step a stage waits, which bounds the speed-up at ``S (1 - bubble)``, and
each stage's peak memory in the step: the bytes of activations autograd kept
saved for backward passes (``rounds_["activation_bytes"]``, counted with
``saved_tensors_hooks``) and, in the last line, its parameters, gradients and
optimizer state. GPipe's peak grows with the micro-batches; 1F1B's stays at
``S - s`` micro-batches on stage ``s``. The last pipeline row builds the
stages on their workers (``strategy__build="workers"``): the state stays in
the stages, with no split and join of the whole state at each epoch's ends.
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


def _fit(client, X, y, epochs: int, strategy: str, **options):
    """Samples/s of the epochs after the first, the last epoch's loss, stages' peak bytes."""
    from daskdist import DaskNeuralNetClassifier

    # stages built on the workers take the recipe, not a built module (and initialise it
    # themselves, so that row starts from other values)
    module = _module if options.get("strategy__build") == "workers" else _module()
    net = DaskNeuralNetClassifier(
        module, criterion=nn.CrossEntropyLoss, max_epochs=epochs + 1, lr=0.01,
        batch_size=BATCH, train_split=None, verbose=0, strategy=strategy, n_replicas=1,
        random_state=0, scheduler_address=client.scheduler.address, **options)
    net.fit(X, y)
    if options.get("strategy__build") == "workers":
        net.release_stages()
    seconds = sum(net.history[1:, "dur"])
    peaks = np.array(net.rounds_["activation_bytes"].tolist() or [[]]).max(axis=0, initial=0)
    return epochs * SAMPLES / seconds, net.history[-1, "train_loss"], peaks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=2, help="timed epochs per row")
    args = parser.parse_args()
    from distributed import Client

    from daskdist.clusters.embedded import embedded_cluster

    X, y = _data()
    stages = 2
    rows = [("plain torch, whole model, 1 thread", _plain(X, y, args.epochs), None, None, ())]
    with embedded_cluster(n_workers=2) as cluster, Client(cluster) as client:
        for schedule, micro, build in (("gpipe", (1, 2, 4, 8), "client"),
                                       ("1f1b", (4, 8), "client"), ("1f1b", (4,), "workers")):
            for m in micro:
                speed, loss, peaks = _fit(
                    client, X, y, args.epochs, "pipeline", strategy__n_stages=stages,
                    strategy__n_micro_batches=m, strategy__schedule=schedule,
                    strategy__build=build)
                name = f"pipeline {schedule}, {stages} stages, {m} micro-batches"
                rows.append((name + (", built on workers" if build == "workers" else ""),
                             speed, loss, (stages - 1) / (m + stages - 1), peaks))
        speed, loss, _ = _fit(client, X, y, args.epochs, "sync")
        rows.append(("daskdist sync, 1 replica (whole model)", speed, loss, None, ()))
    base = rows[1][1]
    print(f"{'run':58} {'samples/s':>10} {'x 1 micro':>10} {'bubble':>7} {'loss':>8} "
          f"{'activations MiB per stage':>26}")
    for name, speed, loss, bubble, peaks in rows:
        print(f"{name:58} {speed:10.0f} {speed / base:10.2f} "
              f"{'' if bubble is None else f'{bubble:.2f}':>7} "
              f"{'' if loss is None else f'{loss:.4f}':>8} "
              f"{' / '.join(f'{p / 2**20:.1f}' for p in peaks):>26}")
    layers = [sum(p.numel() for p in layer.parameters()) for layer in _module()]
    print(f"model: {LAYERS} x Linear({WIDTH}, {WIDTH}), {sum(layers) / 1e6:.1f}M parameters; "
          f"{SAMPLES} samples, batches of {BATCH}, {args.epochs} timed epochs; "
          "parameters + gradients per stage (SGD, no optimizer state): "
          f"{2 * 4 * sum(layers) / stages / 2**20:.0f} MiB (balanced stages)")


if __name__ == "__main__":
    main()
