"""A cost model of a synchronisation round, fitted here and extrapolated to 256 workers.

One command (``python benchmarks/cost_model.py``) measures, fits, checks and
predicts:

1. **Measure.** Fits with 2, 4, 8 and 16 single-threaded workers on this
   machine (``sync``, flat ``local_sgd`` and ``hierarchical`` with groups of
   two workers; MLPs of 0.05M and 0.5M parameters), recording each round's
   synchronisation time (its span minus its slowest replica's compute). With
   2 cores, 16 workers contend for the CPU: the compute time of one step at
   each worker count, against 2 workers, is the *contention factor*, and the
   measured times are divided by it before fitting, so that contention stays
   out of the communication terms.
2. **Fit** the constants: a cost per hop of a round's critical path ``H``
   (a task, the scheduler's messages) and a cost per MB moved on it ``M``,
   both measured directly by chains of tasks between two idle workers; the
   scheduler's cost per task ``S`` (its throughput of trivial tasks; the one
   scheduler handles every task of a round); and, fitted to the rounds, a
   fixed cost per round ``F`` and a cost per transfer ``P``. The
   critical path of each
   strategy (:func:`path`): flat averaging reduces in a tree of fan-in 2 and
   the new state is fetched by every other worker from one; ``hierarchical``
   does that within each group, then across the groups' first workers;
   ``sync`` fetches every peer's gradient; ``ddp`` runs a ring allreduce.
3. **Check** predicted against measured on this machine (contention put
   back) and, where namespace hosts can be built
   (:mod:`daskdist.testing.hosts`), on two hosts of two workers whose links
   are capped at 100 Mbit/s (a cross-host MB then costs what the cap says).
4. **Predict** round time and scaling efficiency for 2 to 256 workers, per
   strategy and model size, with 8 workers per host on 10 Gbit/s links and a
   0.1 ms hop latency (``netem`` is not available to measure latency here;
   it is a parameter), with and without hierarchy and ``topk`` compression,
   and draw the efficiency curves (``benchmarks/out/scaling.png``).

Scaling efficiency is the share of a replica's time spent computing:
``C k / (C k + T)`` for ``k`` local steps of ``C`` seconds per round of ``T``.

Run: ``python benchmarks/cost_model.py [--quick] [--out benchmarks/out]``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time

import numpy as np

FEATURES = 1000
#: Hidden width of the measured MLPs (1,000 features, 10 classes) by parameter count.
MEASURED = {"0.05M": 50, "0.5M": 500}
#: Steps of ``C`` per round for the strategies that take local steps, in predictions.
SYNC_EVERY = 8
#: The data centre the predictions assume.
WORKERS_PER_HOST = 8
LINK_MB_S = 1250.0  # 10 Gbit/s
HOP_LATENCY_S = 1e-4
TOPK_RATIO = 0.02  # topk at density 0.01: an int32 index and a float32 value per kept entry
DDP_FIXED_S = 1e-3  # gloo's allreduce on this machine: about 1 ms plus 3 ms per million
CORES = os.cpu_count() or 2  # this machine's, which the measured workers share


def _levels(n: int) -> int:
    """Levels of a reduction tree of fan-in 2 over ``n`` inputs."""
    return math.ceil(math.log2(n)) if n > 1 else 0


def path(strategy: str, workers: int, group: int = 1) -> dict:
    """What one round does: its critical path and its total work.

    ``hops`` and the state-sized transfers on the critical path within a
    group (``local``) and between groups (``cross``; ``group`` workers per
    group, or host); ``tasks``, the round's Dask tasks (each costs the one
    scheduler some time); ``total``, every state-sized transfer of the round
    (on one machine they share its cores).
    """
    groups = max(workers // group, 1)
    if strategy == "sync":  # every replica fetches every peer's gradient
        return {"hops": 1, "local": group - 1, "cross": workers - group,
                "tasks": workers, "total": workers * (workers - 1)}
    if strategy == "ddp":  # a ring allreduce: 2 (W - 1) steps of 1/W of the state each
        steps = 2 * (workers - 1)
        return {"hops": steps, "local": 0, "cross": steps / workers, "tasks": 0,
                "total": steps}
    if strategy == "hierarchical":  # a tree in each group, then one across the groups
        return {"hops": _levels(group) + _levels(groups) + 2,
                "local": _levels(group) + group - 1, "cross": _levels(groups) + groups - 1,
                "tasks": 2 * workers - 1 + groups, "total": 2 * (workers - 1)}
    if strategy == "local_sgd":  # a tree of fan-in 2, then every worker fetches the new state
        local_levels = _levels(group)
        return {"hops": _levels(workers) + 1,
                "local": local_levels + group - 1,
                "cross": _levels(workers) - local_levels + workers - group,
                "tasks": 2 * workers - 1, "total": 2 * (workers - 1)}
    raise ValueError(strategy)


def round_time(constants: dict, strategy: str, workers: int, mb: float, group: int = 1,
               cross_mb_s: float | None = None, latency_s: float = 0.0,
               cores: float | None = None) -> float:
    """Predicted seconds of one round's synchronisation.

    ``cross_mb_s``: bandwidth between groups (None: the same cost per MB as
    within them, as on one machine); ``cores``: the CPUs that every transfer
    of the round shares (None: each worker has its own, as in a data centre).
    """
    p = path(strategy, workers, group)
    if strategy == "ddp":  # gloo/NCCL's own ring, no Dask task per hop (measured: ~1 ms fixed)
        # (a ring within one host moves at the machine's speed, across hosts at the link's)
        link = cross_mb_s if cross_mb_s and workers > group else 1.0 / constants["M"]
        return DDP_FIXED_S + latency_s * p["hops"] + mb * p["cross"] / link
    cross_cost = constants["M"] if cross_mb_s is None else constants["M"] + 1.0 / cross_mb_s
    fetch = constants.get("P", 0.0)  # each transfer's own messages
    on_path = ((constants["M"] * mb + fetch) * p["local"]
               + (cross_cost * mb + fetch) * p["cross"])
    shared = (constants["M"] * mb + fetch) * p["total"] / cores if cores else 0.0
    return (constants["F"] + (constants["H"] + latency_s) * p["hops"]
            + constants["S"] * p["tasks"] + max(on_path, shared))


# -- 1. measure -------------------------------------------------------------------------------
def _data(n, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, FEATURES)).astype(np.float32)
    return X, X[:, :10].argmax(1).astype(np.int64)


def _fit(client, strategy, hidden, X, y, workers, **options):
    from daskdist import MLP, DaskNeuralNetClassifier

    net = DaskNeuralNetClassifier(
        MLP, strategy=strategy, max_epochs=3, batch_size=32 * workers, lr=0.05, sync_every=2,
        train_split=None, verbose=0, random_state=0, module__n_features=FEATURES,
        module__hidden=(hidden,), scheduler_address=client.scheduler.address, **options)
    net.fit(X, y)
    rounds = net.rounds_[net.rounds_["epoch"] > 0]
    mb = 4 * sum(p.numel() for p in net.module_.parameters()) / 1e6
    steps = 1 if strategy == "sync" else 2  # (sync_every=2)
    return {"sync_s": float(np.median(rounds["sync_s"])),
            "step_s": float(np.median(rounds["compute_s"])) / steps, "mb": mb}


def measure(counts) -> list[dict]:
    """Rounds of each strategy, model size and worker count on this machine."""
    from distributed import Client

    from daskdist.clusters.embedded import embedded_cluster

    rows = []
    for workers in counts:
        X, y = _data(32 * workers * 8)
        with embedded_cluster(n_workers=workers) as cluster, \
                Client(cluster, set_as_default=False) as client:
            for size, hidden in MEASURED.items():
                for strategy, options, group in (
                        ("sync", {}, 1), ("local_sgd", {}, 1),
                        ("hierarchical", {"strategy__groups": [
                            [i, i + 1] for i in range(0, workers, 2)]}, 2)):
                    run = _fit(client, strategy, hidden, X, y, workers, **options)
                    rows.append({"strategy": strategy, "size": size, "workers": workers,
                                 "group": group, **run})
                    print(f"  measured {strategy:12} {size:6} {workers:3} workers: "
                          f"{1e3 * run['sync_s']:7.1f} ms", flush=True)
    base = {r["size"]: r["step_s"] for r in rows if r["workers"] == min(counts)
            and r["strategy"] == "local_sgd"}
    for r in rows:  # contention: a step's compute against the fewest workers
        own = [q["step_s"] for q in rows if q["workers"] == r["workers"]
               and q["size"] == r["size"] and q["strategy"] == "local_sgd"]
        r["contention"] = max(own[0] / base[r["size"]], 1.0)
    return rows


def _relay(x, _hop):
    return x


def hops_and_transfers(repeats: int = 40, mb: float = 8.0) -> dict:
    """``H`` and ``M`` measured directly on two idle workers.

    A chain of tasks alternating between the two workers, each taking the
    previous one's output: with a tiny output every link is one hop
    (scheduler messages, a task); with an ``mb``-MB array every link also
    moves it to the other worker.
    """
    from distributed import Client

    from daskdist.clusters.embedded import embedded_cluster

    with embedded_cluster(n_workers=2) as cluster, Client(cluster, set_as_default=False) as c:
        workers = sorted(c.scheduler_info()["workers"])
        per_link = {}
        for size in (0.0, mb):
            data = c.submit(np.ones, int(size * 1e6 / 8) or 1, workers=[workers[0]], pure=False)
            c.wait_for_workers(2)
            data.result()
            t0 = time.perf_counter()
            x = data
            for i in range(repeats):
                x = c.submit(_relay, x, i, workers=[workers[(i + 1) % 2]], pure=False)
            x.result()
            per_link[size] = (time.perf_counter() - t0) / repeats
        # the scheduler's own cost per task: many independent trivial tasks at once
        c.map(_relay, range(200), range(200), pure=False)  # (warm-up, let go of)
        t0 = time.perf_counter()
        c.gather(c.map(_relay, range(2000), range(2000), pure=False))
        per_task = (time.perf_counter() - t0) / 2000
    return {"H": per_link[0.0], "M": max(per_link[mb] - per_link[0.0], 0.0) / mb,
            "S": per_task}


# -- 2. fit -----------------------------------------------------------------------------------
def fit(rows, direct: dict) -> dict:
    """``F`` and ``P`` fitted to the rounds, given ``H``, ``M`` and ``S`` measured directly.

    What a round takes beyond its hops, tasks (``S`` each, measured: the
    scheduler's throughput) and bytes is a fixed cost ``F`` (the driver's
    work) and ``P`` per transfer (the messages of each fetch). Fitted by
    least squares on relative errors, so that short and long rounds count
    alike; the transfers' part is the larger of the critical path's and the
    whole round's spread over this machine's cores.
    """
    from scipy.optimize import nnls

    def predict(constants, r):
        return round_time(constants, r["strategy"], r["workers"], r["mb"], group=r["group"],
                          cores=CORES)

    best = None
    for fetch in np.linspace(0.0, 2e-3, 41):  # P by search (it sits inside a max)
        A, b = [], []
        for r in rows:
            base = predict({"F": 0.0, "P": fetch, **direct}, r)
            A.append([1.0 / r["sync_s"]])
            b.append(1.0 - base / r["sync_s"])
        (F,), residual = nnls(np.array(A), np.array(b))
        if best is None or residual < best[0]:
            best = (residual, {"F": float(F), "P": float(fetch), **direct})
    return best[1]


# -- 3. check on namespace hosts --------------------------------------------------------------
def measure_hosts(rate: str = "100mbit") -> list[dict]:
    """Rounds of flat and hierarchical ``local_sgd`` on two capped hosts of two workers."""
    from distributed import Client

    from daskdist.testing.hosts import NamespaceHosts, netem_available, unavailable

    reason = unavailable()
    if reason:
        print(f"  namespace hosts skipped: {reason}")
        return []
    ok, said = netem_available()
    print(f"  netem (added latency): {'available' if ok else 'not available'} ({said}); "
          "latency stays a parameter of the model")
    rows = []
    X, y = _data(32 * 4 * 8)
    with NamespaceHosts(worker_hosts=2, workers_per_host=2, rate=rate) as hosts, \
            Client(hosts.scheduler_address, set_as_default=False) as client:
        for strategy in ("local_sgd", "hierarchical"):
            run = _fit(client, strategy, MEASURED["0.5M"], X, y, 4)
            rows.append({"strategy": strategy, "size": "0.5M", "workers": 4, "group": 2,
                         "contention": 1.0, **run})
    return rows


# -- 4. predict -------------------------------------------------------------------------------
def efficiency(constants, strategy, workers, mb, step_s, compressed=False) -> float:
    """Predicted share of time computing, in the assumed data centre."""
    group = min(WORKERS_PER_HOST, workers)
    wire = mb * (TOPK_RATIO if compressed else 1.0)
    t = round_time(constants, strategy, workers, wire, group=group, cross_mb_s=LINK_MB_S,
                   latency_s=HOP_LATENCY_S)
    k = 1 if strategy in ("sync", "ddp") else SYNC_EVERY
    return step_s * k / (step_s * k + t)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2, 4 and 8 workers only")
    parser.add_argument("--out", default=os.path.join("benchmarks", "out"))
    parser.add_argument("--reuse", action="store_true",
                        help="fit the measurements of the last run (in --out) again")
    args = parser.parse_args()
    counts = (2, 4, 8) if args.quick else (2, 4, 8, 16)
    t0 = time.perf_counter()
    os.makedirs(args.out, exist_ok=True)
    saved = os.path.join(args.out, "rounds.json")
    if args.reuse:
        with open(saved) as f:
            rows, host_rows, direct = json.load(f)
        counts = sorted({r["workers"] for r in rows})
    else:
        print("1. measuring rounds on this machine")
        direct = hops_and_transfers()
        rows = measure(counts)
        print("   and on namespace hosts")
        host_rows = measure_hosts()
        with open(saved, "w") as f:
            json.dump([rows, host_rows, direct], f)
    constants = fit(rows, direct)
    print(f"\n2. measured on two idle workers: H = {1e3 * constants['H']:.2f} ms per hop, "
          f"M = {1e3 * constants['M']:.2f} ms per MB, S = {1e3 * constants['S']:.2f} ms per "
          f"task (the scheduler's); fitted to the rounds: F = {1e3 * constants['F']:.2f} ms "
          f"per round, P = {1e3 * constants['P']:.2f} ms per transfer")
    print("\n3. predicted against measured (ms per round; on this machine every transfer of a "
          "round shares its cores; contention: a step's compute against 2 workers)")
    print(f"{'where':10} {'strategy':12} {'size':6} {'workers':>7} {'contention':>10} "
          f"{'measured':>9} {'predicted':>9} {'ratio':>6}")
    errors = []
    for r in rows + host_rows:
        on_hosts = r in host_rows
        predicted = round_time(constants, r["strategy"], r["workers"], r["mb"],
                               group=r["group"], cross_mb_s=12.5 if on_hosts else None,
                               cores=CORES)
        errors.append(abs(np.log(predicted / r["sync_s"])))
        print(f"{'hosts' if on_hosts else 'machine':10} {r['strategy']:12} {r['size']:6} "
              f"{r['workers']:7d} {r['contention']:10.2f} {1e3 * r['sync_s']:9.1f} "
              f"{1e3 * predicted:9.1f} {predicted / r['sync_s']:6.2f}")
    print(f"median |log(predicted / measured)|: {np.median(errors):.2f} "
          f"(a factor of {np.exp(np.median(errors)):.2f})")
    step = {r["size"]: r["step_s"] for r in rows
            if r["workers"] == counts[0] and r["strategy"] == "local_sgd"}
    step_per_mb = step["0.5M"] / next(r["mb"] for r in rows if r["size"] == "0.5M")
    sizes = {"0.5M": 2.0, "5M": 20.0, "50M": 200.0}  # MB of float32 parameters
    print(f"\n4. predicted scaling efficiency, {WORKERS_PER_HOST} workers per host, "
          f"{LINK_MB_S * 8 / 1e3:.0f} Gbit/s links, {HOP_LATENCY_S * 1e3:.1f} ms per hop, "
          f"local steps per round {SYNC_EVERY} (a step: {1e3 * step_per_mb:.1f} ms per MB of "
          "model, 32 samples per replica)")
    strategies = [("sync", False), ("ddp", False), ("local_sgd", False),
                  ("hierarchical", False), ("hierarchical", True)]
    workers = [2, 4, 8, 16, 32, 64, 128, 256]
    curves = {}
    for size, mb in sizes.items():
        print(f"model {size}: " + " | ".join(f"{w:>5}" for w in workers))
        for strategy, compressed in strategies:
            name = strategy + (" + topk" if compressed else "")
            eff = [efficiency(constants, strategy, w, mb, step_per_mb * mb, compressed)
                   for w in workers]
            curves[(size, name)] = eff
            print(f"  {name:20} " + " | ".join(f"{e:5.2f}" for e in eff))
    png = os.path.join(args.out, "scaling.png")
    _plot(curves, workers, sizes, png)
    print(f"\nplot: {png}; {time.perf_counter() - t0:.0f} s in all")


def _plot(curves, workers, sizes, png) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(sizes), figsize=(5 * len(sizes), 4), sharey=True)
    for ax, size in zip(axes, sizes):
        for (s, name), eff in curves.items():
            if s == size:
                ax.plot(workers, eff, marker="o", label=name)
        ax.set_xscale("log", base=2)
        ax.set_title(f"{size} parameters")
        ax.set_xlabel("workers")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("predicted scaling efficiency")
    axes[-1].legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=110)


if __name__ == "__main__":
    main()
