"""The ``ssh`` cluster spec for real: ``sshd`` on network-namespace hosts, a pipeline across them.

Three namespace hosts (:mod:`daskdist.testing.hosts`), each running OpenSSH's
server with keys made for this test (:mod:`daskdist.testing.sshd`);
distributed's ``SSHCluster`` logs in with asyncssh, starts the scheduler on
the first host and a worker on each of the others. Skipped, with the reason,
where that cannot be done; CI sets ``DASKDIST_REQUIRE=ssh`` to make such a
skip a failure.
"""

from __future__ import annotations

import json
import pathlib
import sys

import pytest
import yaml

from daskdist.cli import main
from daskdist.testing import hosts as namespace_hosts
from daskdist.testing import sshd
from daskdist.testing.required import skip_unless_available

ROOT = pathlib.Path(__file__).parents[1]
pytestmark = pytest.mark.timeout(300)


def _reason():
    reason = namespace_hosts.unavailable()
    return f"namespace hosts: {reason}" if reason else sshd.unavailable()


def test_the_default_pipeline_runs_on_workers_started_over_ssh(tmp_path, capsys):
    skip_unless_available("ssh", _reason())
    with namespace_hosts.NamespaceHosts(worker_hosts=2, dask=False) as hosts, \
            sshd.SSHServers(hosts) as servers:
        folder = servers.folder
        # the shipped spec's layout, with this test's hosts, keys and Python
        shipped = yaml.safe_load((ROOT / "cluster_specs" / "ssh.yaml").read_text())
        shipped["timeout"] = "60 s"
        shipped["ssh"].update(hosts=servers.addresses, remote_python=sys.executable,
                              connect_options=servers.connect_options())
        spec = tmp_path / "namespace-ssh.yaml"
        spec.write_text(yaml.safe_dump(shipped))
        before = hosts.counters()
        code = main(["run", str(ROOT / "pipelines" / "digits-mlp.yaml"), "--cluster", str(spec),
                     "--output", str(tmp_path / "run"), "--set", "train.max_epochs=5",
                     "--quiet"])
        moved = hosts.bytes_since(before, hosts.counters())
        assert code == 0, capsys.readouterr().err
    assert not folder.exists()  # keys and configuration are gone
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["cluster"] == "namespace-ssh" and metrics["n_workers"] == 2
    assert metrics["metrics"]["accuracy"] > 0.9
    assert (tmp_path / "run" / "report.md").exists()
    # the shards and the averaged parameters crossed each worker host's link
    for host in (1, 2):
        assert moved[host] > 1_000_000, moved
