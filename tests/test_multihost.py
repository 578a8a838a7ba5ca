"""Workers on several hosts: network namespaces joined by a bridge, real TCP between them.

Two worker hosts of two workers each and a scheduler host, each a Linux network
namespace (:mod:`daskdist.testing.hosts`). Skipped, with the reason, where
namespaces cannot be made (not root, no iproute2).
"""

import time

import numpy as np
import pytest
from distributed import Client
from skorch.callbacks import Callback

from daskdist import MLP, DaskNeuralNetClassifier
from daskdist.strategies.hierarchical import groups_by_host
from daskdist.testing import TinyNet
from daskdist.testing.hosts import NamespaceHosts, unavailable

REASON = unavailable()
pytestmark = [pytest.mark.skipif(REASON is not None, reason=f"namespace hosts: {REASON}"),
              pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def hosts():
    with NamespaceHosts(worker_hosts=2, workers_per_host=2) as built:
        yield built


@pytest.fixture(scope="module")
def hosts_client(hosts):
    with Client(hosts.scheduler_address, set_as_default=False) as client:
        yield client


def _net(client, strategy, module=TinyNet, **kwargs):
    params = dict(max_epochs=6, lr=0.1, batch_size=64, strategy=strategy, sync_every=4,
                  optimizer__momentum=0.9,
                  train_split=None, verbose=0, random_state=0,
                  scheduler_address=client.scheduler.address, module__n_features=64,
                  module__n_outputs=10, module__hidden=32)
    return DaskNeuralNetClassifier(module, **{**params, **kwargs})


def test_workers_sit_on_their_hosts(hosts, hosts_client):
    by_host = hosts.worker_addresses(hosts_client)
    assert [len(w) for w in by_host.values()] == [2, 2]
    # hierarchical's default groups are the hosts
    workers = sorted(w for ws in by_host.values() for w in ws)
    assert groups_by_host(workers) == [[0, 1], [2, 3]]


@pytest.mark.parametrize("strategy, options", [
    ("local_sgd", {}), ("hierarchical", {}), ("ssp", {"strategy__staleness": 2}),
])
def test_strategies_keep_their_accuracy_across_hosts(hosts_client, digits, strategy, options):
    from sklearn.model_selection import train_test_split

    X, y = digits
    X_train, X_test, y_train, y_test = train_test_split(X, y, test_size=0.25, random_state=0)
    net = _net(hosts_client, strategy, **options).fit(X_train, y_train)
    assert net.score(X_test, y_test) > 0.9
    assert set(net.rounds_["replicas"].map(len)) <= {1, 2, 3, 4}


def _sync_bytes_per_round(hosts, client, X, y, strategy, **options):
    """Cross-host bytes of one synchronisation round: a run minus its control run.

    The control is the same fit with one round per epoch; the difference in
    bytes over the worker hosts' links, divided by the difference in rounds,
    is what a round's synchronisation costs between hosts (shards, the
    epoch-end state and the scheduler's messages cancel out). Bytes between
    two worker hosts pass both hosts' links: half the sum crossed.
    """
    runs = {}
    for sync_every in (4, 10_000):
        before = hosts.counters()
        net = _net(client, strategy, module=MLP, module__hidden=(512, 256), max_epochs=2,
                   optimizer__momentum=0.0, sync_every=sync_every,
                   sharding="sequential", **options).fit(X, y)
        moved = hosts.bytes_since(before, hosts.counters())
        runs[sync_every] = (sum(moved[h.index] for h in hosts.worker_hosts) / 2,
                            len(net.rounds_))
    (synced, rounds), (control, control_rounds) = runs[4], runs[10_000]
    return (synced - control) / (rounds - control_rounds), net


def test_hierarchical_sends_fewer_bytes_between_hosts(hosts, hosts_client, digits):
    X, y = digits
    flat, net = _sync_bytes_per_round(hosts, hosts_client, X, y, "local_sgd")
    grouped, _ = _sync_bytes_per_round(hosts, hosts_client, X, y, "hierarchical")
    state = 4 * sum(p.numel() for p in net.module_.parameters())  # (plain SGD: no momentum)
    # hierarchical: one host's mean out to the root's host, one new state back: 2 states
    # per round (measured 2.0); flat averaging sends every replica's share across: about
    # twice that with two workers per host (measured 4.0)
    assert 1.5 * state < grouped < 2.5 * state, grouped / state
    assert flat / grouped > 1.6, (flat / state, grouped / state)


def test_overlapped_hierarchical_sends_fewer_bytes_between_hosts(hosts, hosts_client, digits):
    X, y = digits
    overlap = {"strategy__overlap": True}
    flat, net = _sync_bytes_per_round(hosts, hosts_client, X, y, "local_sgd", **overlap)
    grouped, _ = _sync_bytes_per_round(hosts, hosts_client, X, y, "hierarchical", **overlap)
    state = 4 * sum(p.numel() for p in net.module_.parameters())
    # flat: each of the 4 replicas fetches the other host's 2 deltas (8 states a round);
    # grouped: each fetches the other host's group sum (4 states); measured 7.2 and 3.5
    assert flat / grouped > 1.5, (flat / state, grouped / state)


class KillHost(Callback):
    """Kill every worker process of one host after the first epoch."""

    def __init__(self, hosts, index):
        self.hosts, self.index = hosts, index

    def on_epoch_end(self, net, **kwargs):
        if len(net.history) == 1:
            self.hosts.kill_host(self.index)


def test_losing_a_whole_host_recovers_on_the_other(digits):
    from sklearn.model_selection import train_test_split

    X, y = digits
    X_train, X_test, y_train, y_test = train_test_split(X, y, test_size=0.25, random_state=0)
    with NamespaceHosts(worker_hosts=2, workers_per_host=2) as hosts, \
            Client(hosts.scheduler_address, set_as_default=False) as client:
        lost = hosts.worker_hosts[1]
        net = _net(client, "local_sgd", max_epochs=4, n_replicas=4,
                   callbacks=[("kill", KillHost(hosts, lost.index))]).fit(X_train, y_train)
        # the scheduler drops a dead worker when it sees its connection close, which may come
        # after the fit went on without it: wait for that, and say what was found otherwise
        deadline = time.monotonic() + 30
        while hosts.worker_addresses(client)[lost.index] and time.monotonic() < deadline:
            time.sleep(0.2)
        left = hosts.worker_addresses(client)
        assert left[lost.index] == [] and len(left[hosts.worker_hosts[0].index]) == 2, (
            f"workers left {left}; processes still in the lost host's namespace: "
            f"{hosts.pids_in(lost.index)}; recoveries:\n{net.recoveries_}")
    # the replicas of the lost host moved to the other; at most a round lost per recovery
    assert len(net.recoveries_) >= 1 and net.recoveries_["rounds_lost"].max() <= 1
    assert net.rounds_["round"].tolist() == list(range(len(net.rounds_)))
    assert net.score(X_test, y_test) > 0.9
    assert np.isfinite(net.history[-1, "train_loss"])


def _ours(tag):
    import subprocess

    names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
    return [n for n in (names + links).split() if n.startswith(tag)]


def test_hosts_leave_nothing_behind_when_the_body_fails_or_the_process_dies():
    import os
    import signal
    import subprocess
    import sys
    import time

    from daskdist.testing.hosts import remove_stale

    with pytest.raises(RuntimeError, match="the test failed"):
        with NamespaceHosts(worker_hosts=1, workers_per_host=1) as made:
            tag, processes = made.tag, [p for h in made.hosts for p in h.processes]
            assert _ours(tag)
            raise RuntimeError("the test failed")
    assert _ours(tag) == [] and all(p.poll() is not None for p in processes)
    # a process that dies with its hosts up leaves them to the next start, which removes them
    child = subprocess.Popen(
        [sys.executable, "-c", "from daskdist.testing.hosts import NamespaceHosts; "
         "h = NamespaceHosts(worker_hosts=1, workers_per_host=1).__enter__(); "
         "print(h.tag, flush=True); import time; time.sleep(600)"],
        stdout=subprocess.PIPE, text=True)
    tag = child.stdout.readline().strip()
    assert tag and _ours(tag)
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    time.sleep(0.5)
    removed = remove_stale()
    assert _ours(tag) == [] and any(name.startswith(tag) for name in removed)
