"""``strategy__overlap=True``: each round's average folded in one round late.

The reference is plain torch in this process, written from the update rule
in :mod:`daskdist.worker.overlap_tasks`: each replica a module with its own
optimizer, kept from round to round; the anchor a vector that folds in one
round's mean change at a time (through torch's ``SGD(nesterov=True)`` for
``diloco``); a replica starting round ``r`` from its own parameters, less
what it sent in round ``r - 2``, plus what the anchor gained from that
round's mean.
"""

import copy
import math

import numpy as np
import pytest
import torch

from daskdist import DaskNeuralNetClassifier
from daskdist.state import load_params, params_vector
from daskdist.strategies import resolve_strategy
from daskdist.testing import TinyNet, make_classification, reference_steps
from daskdist.worker.fragments import fragment_bounds

LR = 0.1
EPOCHS = 2
SYNC_EVERY = 2  # 4 rounds an epoch on tiny_data's 240 rows: every case of the rule


def _net(strategy="local_sgd", **kwargs):
    # random_state=None: the weights come from torch's RNG, seeded as for the reference
    params = {**dict(max_epochs=EPOCHS, lr=LR, batch_size=32, train_split=None, verbose=0,
                     sharding="sequential", random_state=None, n_replicas=2,
                     strategy=strategy, sync_every=SYNC_EVERY, optimizer__momentum=0.9,
                     strategy__overlap=True), **kwargs}
    torch.manual_seed(0)
    return DaskNeuralNetClassifier(TinyNet, **params)


def _overlapped(X, y, *, outer=None, fp16=False, replicas=2, batch_size=32, late=1):
    """Overlapped local SGD (or, with ``outer=(lr, momentum)``, DiLoCo) in one process.

    Each round's mean is folded in ``late`` rounds late (2: ``hierarchical``).
    """
    torch.manual_seed(0)
    anchor_module = TinyNet()
    outer_opt = None if outer is None else torch.optim.SGD(
        anchor_module.parameters(), lr=outer[0], momentum=outer[1], nesterov=True)
    copies = [copy.deepcopy(anchor_module) for _ in range(replicas)]
    inner = [torch.optim.SGD(c.parameters(), lr=LR, momentum=0.9) for c in copies]
    shards = np.array_split(np.arange(len(X)), replicas)
    per = batch_size // replicas
    steps = max(math.ceil(len(s) / per) for s in shards)
    firsts = list(range(0, steps, SYNC_EVERY))
    assert len(firsts) >= late + 2  # an epoch reaches the rounds that fold a mean in

    def fold(mean):
        before = params_vector(anchor_module)
        if outer_opt is None:
            load_params(anchor_module, before + mean)
        else:
            offset = 0
            for p in anchor_module.parameters():  # the negated mean change as the gradient
                n = p.numel()
                p.grad = torch.from_numpy(-mean[offset:offset + n].reshape(p.shape).copy())
                offset += n
            outer_opt.step()
        return params_vector(anchor_module) - before

    for _ in range(EPOCHS):
        g = params_vector(anchor_module)
        starts = [g.copy() for _ in copies]
        ends, sent, means = [None] * replicas, [], []
        for k, first in enumerate(firsts):
            if k > late:  # round k - 1 - late's mean arrives
                gained = fold(means[k - 1 - late])
                starts = [ends[i] - sent[k - 1 - late][i] + gained for i in range(replicas)]
            elif k >= 1:
                starts = [e.copy() for e in ends]
            changes, weights = [], []
            for i, (replica, opt, shard) in enumerate(zip(copies, inner, shards)):
                load_params(replica, starts[i])  # in place: the optimizer keeps its state
                seen = reference_steps(replica, opt, X, y, [
                    shard[k * per:(k + 1) * per]
                    for k in range(first, min(first + SYNC_EVERY, steps))])
                ends[i] = params_vector(replica)
                change = ends[i] - starts[i]
                changes.append(change.astype(np.float16).astype(np.float32) if fp16 else change)
                weights.append(seen)
            sent.append(changes)
            means.append(sum(np.float32(w / sum(weights)) * c for w, c in zip(weights, changes)))
        for mean in means[max(len(means) - 1 - late, 0):]:  # the epoch's end: what is pending
            fold(mean)
    return params_vector(anchor_module)


def _streaming(X, y, *, fragments, sync_every, outer=(0.7, 0.9), replicas=2, batch_size=32):
    """Streaming DiLoCo in one process: a fragment's change since it was last folded in,
    exchanged one fragment a round (every fragment in an epoch's last round), folded one
    round late by an outer SGD of the fragment's own."""
    torch.manual_seed(0)
    anchor = TinyNet()
    tensors = list(anchor.parameters())
    bounds = fragment_bounds([t.numel() for t in tensors], fragments)
    starts = np.cumsum([0] + [t.numel() for t in tensors])[:-1]
    groups = [[t for t, at in zip(tensors, starts) if lo <= at < hi] for lo, hi in bounds]
    outers = [torch.optim.SGD(g, lr=outer[0], momentum=outer[1], nesterov=True)
              for g in groups]
    copies = [copy.deepcopy(anchor) for _ in range(replicas)]
    inner = [torch.optim.SGD(c.parameters(), lr=LR, momentum=0.9) for c in copies]
    shards = np.array_split(np.arange(len(X)), replicas)
    per = batch_size // replicas
    steps = max(math.ceil(len(s) / per) for s in shards)
    firsts = list(range(0, steps, sync_every // fragments))
    whole = (0, int(params_vector(anchor).size))

    def fold(part, mean):
        before = params_vector(anchor)
        lo, hi = part
        for (f_lo, f_hi), group, opt in zip(bounds, groups, outers):
            if lo <= f_lo and f_hi <= hi:  # this fragment's outer step
                at = f_lo - lo
                for p in group:
                    p.grad = torch.from_numpy(-mean[at:at + p.numel()].reshape(p.shape).copy())
                    at += p.numel()
                opt.step()
        return params_vector(anchor) - before

    round_ = 0
    for _ in range(EPOCHS):
        x = [params_vector(anchor) for _ in copies]
        sent, means = [], []
        for k, first in enumerate(firsts):
            if k >= 2:  # round k - 2's mean arrives: give up what was sent, take the gain
                (lo, hi), changes = sent[k - 2]
                gained = fold((lo, hi), means[k - 2])
                for i in range(replicas):
                    x[i][lo:hi] -= changes[i]
                    x[i] = x[i] + gained
            g = params_vector(anchor)
            lo, hi = whole if k == len(firsts) - 1 else bounds[round_ % fragments]
            changes, weights = [], []
            for i, (replica, opt, shard) in enumerate(zip(copies, inner, shards)):
                load_params(replica, x[i])  # in place: the optimizer keeps its state
                weights.append(reference_steps(replica, opt, X, y, [
                    shard[s * per:(s + 1) * per]
                    for s in range(first, min(first + sync_every // fragments, steps))]))
                x[i] = params_vector(replica)
                kept = x[i].copy()
                if k >= 1:  # what was sent last round is not this round's to send
                    (p_lo, p_hi), previous = sent[k - 1]
                    kept[p_lo:p_hi] -= previous[i]
                changes.append((kept - g)[lo:hi])
            sent.append(((lo, hi), changes))
            means.append(sum(np.float32(w / sum(weights)) * c for w, c in zip(weights, changes)))
            round_ += 1
        for k in range(max(len(firsts) - 2, 0), len(firsts)):  # the epoch's end
            fold(sent[k][0], means[k])
    return params_vector(anchor)


def test_streaming_diloco_equals_a_single_process_reference(client, tiny_data):
    X, y = tiny_data
    options = dict(sync_every=4, strategy__fragments=2, strategy__outer_lr=0.7,
                   strategy__outer_momentum=0.9)
    net = _net("diloco", **options).fit(X, y)
    expected = _streaming(X, y, fragments=2, sync_every=4)
    np.testing.assert_allclose(params_vector(net.module_), expected, atol=2e-5, rtol=0)
    # rounds of sync_every / fragments steps, each exchanging one fragment but the last
    rounds = net.rounds_
    assert len(rounds) == EPOCHS * 4
    n = params_vector(net.module_).size
    sizes = [hi - lo for lo, hi in fragment_bounds([p.numel() for p in net.module_.parameters()],
                                                   2)]
    for round_, moved in zip(rounds["round"], rounds["bytes"]):
        # each replica fetches the other's float32 change: of one fragment, or of all
        if round_ % 4 in (1, 2):
            assert moved == 2 * 4 * sizes[round_ % 2]
        elif round_ % 4 == 3:
            assert moved == 2 * 4 * n
    # not plain overlapped diloco: fragments change the maths
    plain = _net("diloco", sync_every=4, strategy__outer_lr=0.7,
                 strategy__outer_momentum=0.9).fit(X, y)
    assert np.abs(params_vector(net.module_) - params_vector(plain.module_)).max() > 1e-4


@pytest.mark.parametrize("strategy, options, outer", [
    ("local_sgd", {}, None),
    ("local_sgd", {"strategy__compression": "fp16"}, None),
    ("diloco", {"strategy__outer_lr": 0.7, "strategy__outer_momentum": 0.9}, (0.7, 0.9)),
    # two rounds late: the replicas' one group (by host), and two groups of two
    ("hierarchical", {"strategy__compression": "fp16"}, None),
    ("hierarchical", {"n_replicas": 4, "strategy__groups": [[0, 1], [2, 3]]}, None),
    ("diloco", {"strategy__outer_lr": 0.7, "strategy__outer_momentum": 0.9, "n_replicas": 4,
                "strategy__groups": [[0, 1], [2, 3]]}, (0.7, 0.9)),
])
def test_overlapped_rounds_equal_a_single_process_reference(client, tiny_data, strategy,
                                                            options, outer):
    X, y = tiny_data
    net = _net(strategy, **options).fit(X, y)
    fp16 = options.get("strategy__compression") == "fp16"
    expected = _overlapped(X, y, outer=outer, fp16=fp16, replicas=options.get("n_replicas", 2),
                           late=2 if strategy == "hierarchical" or "strategy__groups" in options
                           else 1)
    np.testing.assert_allclose(params_vector(net.module_), expected, atol=2e-5, rtol=0)
    # the delay changes the maths: not the non-overlapped fit
    flat = {k: v for k, v in options.items() if k != "strategy__groups" or strategy != "diloco"}
    plain = _net(strategy, strategy__overlap=False, **flat).fit(X, y)
    assert np.abs(params_vector(net.module_) - params_vector(plain.module_)).max() > 1e-4
    rounds = net.rounds_
    assert len(rounds) == EPOCHS * 4 and list(rounds["round"]) == list(range(EPOCHS * 4))
    assert (rounds["sync_s"] >= 0).all()
    assert (rounds.groupby("epoch")["samples"].sum() == len(X)).all()


def test_overlap_options_are_checked(client):
    assert resolve_strategy("local_sgd", {"overlap": True}).overlap is True
    assert resolve_strategy("diloco", {"overlap": True}).exchanges_deltas
    with pytest.raises(ValueError, match="overlap must be True or False"):
        resolve_strategy("local_sgd", {"overlap": "yes"})
    with pytest.raises(ValueError, match="cannot be combined with a deadline"):
        resolve_strategy("local_sgd", {"overlap": True, "deadline": 2.0})
    assert resolve_strategy("hierarchical", {"overlap": True}).overlap is True
    assert resolve_strategy("diloco", {"overlap": True, "groups": "host"}).groups == "host"
    for options, message in [({"groups": "host"}, "groups needs overlap=True"),
                             ({"groups": "host", "overlap": True, "fragments": 2,
                               "sync_every": 8}, "cannot be combined with fragments"),
                             ({"groups": [[0], [0]], "overlap": True}, "each replica once"),
                             ({"groups": "rack", "overlap": True}, "list of non-empty lists")]:
        with pytest.raises(ValueError, match=message):
            resolve_strategy("diloco", options)
    assert resolve_strategy("diloco", {"overlap": True, "fragments": 4,
                                       "sync_every": 8}).round_steps() == 2
    for options, message in [({"fragments": 2}, "needs overlap=True"),
                             ({"fragments": 0, "overlap": True}, "positive integer"),
                             ({"fragments": 3, "overlap": True, "sync_every": 8},
                              "must be a multiple of fragments=3")]:
        with pytest.raises(ValueError, match=message):
            resolve_strategy("diloco", options)
    with pytest.raises(ValueError, match="Cannot cut 4 parameter tensors into 5 fragments"):
        DaskNeuralNetClassifier(TinyNet, strategy="diloco", sync_every=5,
                                strategy__overlap=True, strategy__fragments=5,
                                max_epochs=1).fit(*make_classification())


def test_rounds_wait_for_their_predecessor_on_workers_with_several_threads(client, tiny_data):
    """A round reads its predecessor's result where that round keeps it, not through Dask:
    with two threads a worker starts the next round while the previous one still runs, and
    the next one waits for it (seceded from the thread pool) instead of failing."""
    from distributed import Client, LocalCluster

    X, y = tiny_data
    expected = params_vector(_net(max_epochs=1).fit(X, y).module_)
    with LocalCluster(n_workers=2, threads_per_worker=2, processes=False,
                      dashboard_address=None) as cluster, Client(cluster) as other:
        net = _net(max_epochs=1, scheduler_address=other.scheduler.address).fit(X, y)
        waited = other.run(_waits)
    np.testing.assert_allclose(params_vector(net.module_), expected, atol=1e-6, rtol=0)
    assert len(net.recoveries_) == 0
    assert sum(waited.values()) >= 1  # some round did start before its predecessor ended


def _waits():
    from daskdist.worker import runtime

    return runtime.waits_seen()
