"""Cluster specs: the shipped files parse, render and start; broken ones say what is wrong."""

from __future__ import annotations

import importlib.util
import multiprocessing
import pathlib

import dask
import pytest
import yaml
from distributed import Client, LocalCluster, Security
from distributed.core import Status
from distributed.deploy.spec import SpecCluster

from daskdist.clusters import (
    DEFAULT_SPEC,
    PACKAGED_SPECS,
    ClusterSpec,
    ClusterSpecError,
    load_cluster_spec,
)

SPECS = pathlib.Path(__file__).parents[1] / "cluster_specs"
SHIPPED = sorted(SPECS.glob("*.yaml"))
BACKENDS = {"local": "local", "local-tls": "local", "local-cuda": "local-cuda", "ssh": "ssh",
            "slurm": "slurm", "pbs": "pbs", "kubernetes": "kubernetes", "address": "address"}


def write_spec(tmp_path, text, name="broken"):
    path = tmp_path / f"{name}.yaml"
    path.write_text(text)
    return path


@pytest.fixture
def nothing_starts():
    """Fail when the test leaves a new cluster or child process behind."""
    clusters, children = set(SpecCluster._instances), set(multiprocessing.active_children())
    yield
    assert set(SpecCluster._instances) - clusters == set()
    assert set(multiprocessing.active_children()) - children == set()


# --- the shipped specs -----------------------------------------------------


def test_every_issue_spec_is_shipped():
    assert sorted(path.stem for path in SHIPPED) == sorted(BACKENDS)


@pytest.mark.parametrize("path", SHIPPED, ids=lambda path: path.stem)
def test_shipped_spec_parses(path):
    spec = load_cluster_spec(path)
    assert isinstance(spec, ClusterSpec)
    assert (spec.name, spec.backend, spec.path) == (path.stem, BACKENDS[path.stem], path)
    assert spec.dashboard_link is None


def test_packaged_copies_equal_the_shipped_specs():
    packaged = sorted(PACKAGED_SPECS.glob("*.yaml"))
    assert [path.name for path in packaged] == [path.name for path in SHIPPED]
    for shipped, copy in zip(SHIPPED, packaged):
        assert copy.read_bytes() == shipped.read_bytes(), f"{copy} differs from {shipped}"


def test_names_resolve_to_the_working_directory_first_then_the_packaged_copy(
        tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert load_cluster_spec("slurm").path == PACKAGED_SPECS / "slurm.yaml"
    assert load_cluster_spec().name == DEFAULT_SPEC == "local"
    (tmp_path / "cluster_specs").mkdir()
    write_spec(tmp_path / "cluster_specs", "backend: local\nworkers: 3\n", name="local")
    spec = load_cluster_spec("local")
    assert spec.path == pathlib.Path("cluster_specs/local.yaml").absolute()
    assert spec.data["workers"] == 3
    with pytest.raises(ClusterSpecError, match="nope: no cluster spec of that name.*slurm"):
        load_cluster_spec("nope")
    with pytest.raises(ClusterSpecError, match="missing.yaml: no such cluster spec file"):
        load_cluster_spec("missing.yaml")


# --- dry runs --------------------------------------------------------------


def test_slurm_dry_run_renders_the_job_script(nothing_starts):
    spec = load_cluster_spec(SPECS / "slurm.yaml", overrides={
        "jobqueue.queue": "gpu", "jobqueue.job_extra_directives": ["--gres=gpu:1"]})
    text = spec.dry_run()
    for line in ("#SBATCH -p gpu", "#SBATCH --cpus-per-task=1", "#SBATCH --mem=4G",
                 "#SBATCH -t 01:00:00", "#SBATCH --gres=gpu:1",
                 "#SBATCH -e slurm-logs/dask-worker-%J.err"):
        assert line in text
    assert "-m distributed.cli.dask_worker tcp://{scheduler}:8786" in text
    assert "--nthreads 1" in text


def test_a_dry_run_creates_no_log_directory(tmp_path, monkeypatch, nothing_starts):
    monkeypatch.chdir(tmp_path)
    text = load_cluster_spec(SPECS / "slurm.yaml", overrides={
        "jobqueue.log_directory": "logs/jobs"}).dry_run()
    assert "#SBATCH -o logs/jobs/dask-worker-%J.out" in text
    assert not (tmp_path / "logs").exists()


def test_pbs_dry_run_renders_the_job_script(nothing_starts):
    text = load_cluster_spec(SPECS / "pbs.yaml", overrides={"jobqueue.processes": 2}).dry_run()
    assert "#PBS -l select=1:ncpus=4:mem=15GB" in text
    assert "#PBS -l walltime=01:00:00" in text
    assert "-m distributed.cli.dask_worker tcp://{scheduler}:8786" in text
    assert "--nworkers 2 --nanny" in text


def test_jobqueue_dry_run_with_tls_files_passes_them_to_the_workers(tmp_path, nothing_starts):
    tls = {"ca_file": "/certs/ca.pem", "cert": "/certs/node.pem", "key": None}
    text = load_cluster_spec(SPECS / "slurm.yaml", overrides={"tls": tls}).dry_run()
    assert "dask_worker tls://{scheduler}:8786" in text
    assert "--tls-ca-file /certs/ca.pem --tls-cert /certs/node.pem --tls-key /certs/node.pem" \
        in text


def test_kubernetes_dry_run_is_the_dask_cluster_resource(nothing_starts):
    spec = load_cluster_spec(SPECS / "kubernetes.yaml", overrides={
        "workers": None, "adapt": {"minimum": 1, "maximum": 4}, "kubernetes.image": "me/img:1"})
    cluster, autoscaler = yaml.safe_load_all(spec.dry_run())
    assert cluster["kind"] == "DaskCluster"
    assert cluster["metadata"]["name"] == "daskdist"
    worker = cluster["spec"]["worker"]
    assert worker["replicas"] == 1
    assert worker["spec"]["containers"][0]["image"] == "me/img:1"
    assert worker["spec"]["containers"][0]["resources"]["limits"] == {"cpu": "1", "memory": "4Gi"}
    assert autoscaler["kind"] == "DaskAutoscaler"
    assert autoscaler["spec"] == {"cluster": "daskdist", "minimum": 1, "maximum": 4}


def test_local_dry_run_shows_the_options_daskdist_config_gives(nothing_starts):
    with dask.config.set({"daskdist.cluster.n-workers": 3}):
        text = load_cluster_spec(SPECS / "local.yaml").dry_run()
    assert "n_workers: 3" in text
    assert "processes: true" in text  # always: torch trains in worker processes
    assert "distributed.worker.profile.enabled: false" in text
    tls = load_cluster_spec(SPECS / "local-tls.yaml").dry_run()
    assert "temporary certificates" in tls


def test_ssh_and_address_dry_runs_name_hosts_and_address(nothing_starts):
    ssh = load_cluster_spec(SPECS / "ssh.yaml").dry_run()
    assert "# scheduler on node-1.example.org:" in ssh
    assert "# 1 worker(s) on node-2.example.org:" in ssh
    assert "distributed.cli.dask_spec {scheduler} --spec" in ssh
    address = load_cluster_spec(SPECS / "address.yaml").dry_run()
    assert "tcp://scheduler.example.org:8786" in address


# --- broken specs ----------------------------------------------------------

SLURM = "backend: slurm\nworkers: 2\njobqueue:\n  cores: 4\n  memory: 16GB\n"

BROKEN = {
    "unknown key": (SLURM + "  cors: 2\n",
                    "jobqueue.cors: unknown key (did you mean 'cores'?); "
                    "expected one of: account,"),
    "unknown top-level key": ("backend: local\nwrokers: 2\n",
                              "wrokers: unknown key for backend 'local' (did you mean 'workers'?)"),
    "key of another backend": ("backend: local\njobqueue: {cores: 4}\n",
                               "jobqueue: unknown key for backend 'local'"),
    "wrong type": (SLURM.replace("cores: 4", "cores: four"),
                   "jobqueue.cores: expected an integer >= 1, got 'four'"),
    "float count": ("backend: local\nworkers: 2.0\n",
                    "workers: expected an integer >= 1 or null, got 2.0"),
    "unquoted walltime": (SLURM + "  walltime: 1:00:00\n",
                          "jobqueue.walltime: expected a string such as '01:00:00' or null, "
                          "got 3600"),
    "bad size": (SLURM.replace("16GB", "lots"),
                 "jobqueue.memory: expected a size such as '16GB', got 'lots'"),
    "bad duration": ("backend: local\ntimeout: soon\n",
                     "timeout: expected a duration such as 90, '90s' or '10 minutes' or null, "
                     "got 'soon'"),
    "missing field": (SLURM.replace("  memory: 16GB\n", ""),
                      "jobqueue.memory: missing required field; expected a size such as '16GB'"),
    "missing section": ("backend: kubernetes\nworkers: 2\n",
                        "kubernetes: missing required field; expected a mapping"),
    "missing backend": ("workers: 2\n",
                        "backend: missing required field; expected one of: address, "),
    "unknown backend": ("backend: slurmm\n",
                        "backend: expected one of: address, kubernetes, local, local-cuda, "
                        "pbs, slurm, ssh; got 'slurmm' (did you mean 'slurm'?)"),
    "no workers": (SLURM.replace("workers: 2\n", ""),
                   "workers: missing required field; expected an integer >= 1, or adapt"),
    "workers and adapt": (SLURM + "adapt: {minimum: 1, maximum: 2}\n",
                          "workers: give either workers (a fixed number) or adapt"),
    "adapt backwards": ("backend: local\nadapt: {minimum: 3, maximum: 2}\n",
                        "adapt.maximum: expected an integer >= adapt.minimum (3), got 2"),
    "adapt unknown key": ("backend: local\nadapt: {minimum: 1, maximum: 2, max: 3}\n",
                          "adapt.max: unknown key (did you mean 'maximum'?)"),
    "adapt where none": ("backend: ssh\nadapt: {minimum: 1, maximum: 2}\nssh: {hosts: [a, b]}\n",
                         "adapt: unknown key for backend 'ssh'"),
    "temporary tls for an address": ("backend: address\naddress: tls://s:8786\ntls: true\n",
                                     "tls: expected a mapping with ca_file, cert and key, "
                                     "got true"),
    "tls without cert": ("backend: local\ntls: {ca_file: ca.pem}\n",
                         "tls.cert: missing required field; "
                         "expected the path of the certificate (PEM)"),
    "one ssh host": ("backend: ssh\nssh: {hosts: [a]}\n",
                     "ssh.hosts: expected a list of at least two host names"),
    "list item": ("backend: ssh\nssh: {hosts: [a, 2]}\n",
                  "ssh.hosts[1]: expected a string, got 2"),
    "enum": ("backend: kubernetes\nworkers: 1\n"
             "kubernetes: {image: x, scheduler_service_type: Public}\n",
             "kubernetes.scheduler_service_type: expected 'ClusterIP', 'NodePort' or "
             "'LoadBalancer' or null, got 'Public'"),
    "not a mapping": ("- backend: local\n", "-: expected a mapping of keys such as "
                                            "'backend: local', got ["),
    "not yaml": ("backend: [local\n", "not valid YAML: "),
}


@pytest.mark.parametrize("text, message", BROKEN.values(), ids=BROKEN)
def test_broken_spec_names_file_field_and_expectation(tmp_path, text, message):
    path = write_spec(tmp_path, text)
    with pytest.raises(ClusterSpecError) as info:
        load_cluster_spec(path)
    error = str(info.value)
    assert isinstance(info.value, ValueError)
    assert error.startswith(f"{path}: ")
    assert message in error
    assert "\n" not in error


def test_overrides_apply_before_validation_and_are_named_in_errors():
    spec = load_cluster_spec(SPECS / "slurm.yaml", overrides={"jobqueue.cores": 8, "workers": 5})
    assert spec.data["jobqueue"]["cores"] == 8
    assert "#SBATCH --cpus-per-task=8" in spec.dry_run()
    assert load_cluster_spec(SPECS / "slurm.yaml").data["jobqueue"]["cores"] == 1
    with pytest.raises(ClusterSpecError, match=r"jobqueue\.cores \(from overrides\): expected"):
        load_cluster_spec(SPECS / "slurm.yaml", overrides={"jobqueue.cores": "eight"})


@pytest.mark.skipif(importlib.util.find_spec("dask_cuda") is not None,
                    reason="dask-cuda is installed")
def test_missing_optional_package_names_the_extra_to_install(nothing_starts):
    spec = load_cluster_spec(SPECS / "local-cuda.yaml")
    with pytest.raises(ImportError, match=r"local-cuda\.yaml: backend: 'local-cuda' needs the "
                                          r"dask-cuda package: pip install 'daskdist\[cuda\]'"):
        with spec.connect():
            pass


def test_missing_tls_file_is_named_before_anything_starts(tmp_path, nothing_starts):
    path = write_spec(tmp_path, f"backend: local\ntls: {{ca_file: {tmp_path}/ca.pem, "
                                f"cert: {tmp_path}/cert.pem}}\n")
    with pytest.raises(ClusterSpecError, match=r"tls\.ca_file: no such file"):
        with load_cluster_spec(path).connect():
            pass


# --- starting clusters -----------------------------------------------------


def test_local_spec_starts_two_workers_and_closes_them():
    spec = load_cluster_spec(SPECS / "local.yaml", overrides={"workers": 2})
    with spec.connect(timeout=60) as client:
        assert len(client.scheduler_info()["workers"]) == 2
        assert client.submit(sum, [1, 2]).result() == 3
        assert spec.dashboard_link == client.dashboard_link
        cluster = client.cluster
    assert client.status == "closed"
    assert cluster.status == Status.closed
    assert spec.dashboard_link is None


def test_local_tls_spec_encrypts_and_refuses_plain_clients():
    pytest.importorskip("cryptography")
    spec = load_cluster_spec(SPECS / "local-tls.yaml", overrides={"workers": 1})
    with spec.connect(timeout=60) as client:
        address = client.scheduler.address
        assert address.startswith("tls://")
        assert client.submit(sum, [1, 2]).result() == 3
        with pytest.raises(TypeError, match="TLS expects"):
            Client(address, timeout="5s")


def test_local_spec_with_tls_files(tmp_path):
    pytest.importorskip("cryptography")
    certificates = Security.temporary()
    (tmp_path / "ca.pem").write_text(certificates.tls_ca_file)
    (tmp_path / "node.pem").write_text(certificates.tls_scheduler_cert)
    (tmp_path / "node.key").write_text(certificates.tls_scheduler_key)
    path = write_spec(tmp_path, f"backend: local\nworkers: 1\n"
                                f"tls: {{ca_file: {tmp_path}/ca.pem, cert: {tmp_path}/node.pem, "
                                f"key: {tmp_path}/node.key}}\n", name="mine")
    with load_cluster_spec(path).connect(timeout=30) as client:
        assert client.scheduler.address.startswith("tls://")
        assert client.submit(sum, [1, 2]).result() == 3


def test_adaptive_local_spec_starts_with_its_minimum():
    spec = load_cluster_spec(SPECS / "local.yaml", overrides={
        "adapt": {"minimum": 1, "maximum": 2}})
    with spec.connect(timeout=30) as client:
        assert len(client.scheduler_info()["workers"]) >= 1
        assert client.submit(sum, [1, 2]).result() == 3


@pytest.fixture
def running_cluster():
    with LocalCluster(n_workers=1, processes=False, dashboard_address=":0") as cluster:
        yield cluster


def test_address_spec_connects_to_a_running_scheduler(tmp_path, running_cluster):
    path = write_spec(tmp_path, f"backend: address\naddress: {running_cluster.scheduler_address}\n"
                                "wait_for_workers: 1\n", name="mine")
    with load_cluster_spec(path).connect(timeout=10) as client:
        assert client.scheduler.address == running_cluster.scheduler_address
        assert client.submit(sum, [1, 2]).result() == 3
    assert client.status == "closed"
    assert running_cluster.status == Status.running  # not ours to close


def test_too_few_workers_is_a_clear_timeout(tmp_path, running_cluster):
    path = write_spec(tmp_path, f"backend: address\naddress: {running_cluster.scheduler_address}\n"
                                "wait_for_workers: 2\n", name="mine")
    with pytest.raises(TimeoutError, match=r"mine\.yaml: only 1 of 2 worker\(s\) connected within "
                                           r"1 s \(are workers connected to this scheduler\?\)"):
        with load_cluster_spec(path).connect(timeout=1):
            pass
