"""Several hosts on one machine: network namespaces, veth pairs, a bridge, real Dask processes.

:class:`NamespaceHosts` builds a small data centre for tests and benchmarks:
one Linux network namespace per host, each joined to a bridge in the
machine's own namespace by a veth pair and given an address of its own. The
first host runs ``dask scheduler``, the others ``dask worker`` processes
(real processes, real TCP between hosts); the client connects from the
machine's namespace over the bridge. Traffic between two workers of one host
stays inside its namespace, so the counters of a host's veth count exactly
what crossed that host's boundary (:meth:`NamespaceHosts.counters`).

Links can be given a bandwidth cap (``tc qdisc ... tbf``, both directions);
added latency needs the kernel's ``netem`` queueing discipline, which
:func:`netem_available` detects (these build machines lack it).

Everything made is removed on exit — processes, namespaces, links, the
bridge — also when the body raises, and namespaces left behind by a process
that died are removed by the next start. Needs root and iproute2;
:func:`unavailable` says why not, for tests to skip with.

Example::

    with NamespaceHosts(worker_hosts=2, workers_per_host=2) as hosts:
        with Client(hosts.scheduler_address) as client:
            before = hosts.counters()
            ...  # a fit
            moved = hosts.bytes_since(before, hosts.counters())
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

__all__ = ["NamespaceHosts", "Host", "unavailable", "netem_available"]

#: Prefix of every namespace and link this module makes (with the making process's id).
PREFIX = "ddh"
_SUBNET = "10.213"
_SCHEDULER_PORT = 8786
_instances = itertools.count()


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], check=check, capture_output=True, text=True)


def unavailable() -> str | None:
    """Why namespace hosts cannot be built here (None: they can)."""
    if shutil.which("ip") is None or shutil.which("tc") is None:
        return "iproute2 (ip, tc) is not installed"
    if os.geteuid() != 0:
        return "building network namespaces needs root"
    name = f"{PREFIX}{os.getpid()}pr"
    made = _ip("netns", "add", name, check=False)
    if made.returncode != 0:
        return f"'ip netns add' is not allowed here: {made.stderr.strip()}"
    _ip("netns", "del", name, check=False)
    return None


def netem_available() -> tuple[bool, str]:
    """Whether the kernel offers ``netem`` (added latency), and what ``tc`` said."""
    name = f"{PREFIX}{os.getpid()}nm"
    _ip("link", "add", name, "type", "veth", "peer", "name", f"{name}p", check=False)
    try:
        done = subprocess.run(["tc", "qdisc", "add", "dev", name, "root", "netem",
                               "delay", "1ms"], capture_output=True, text=True)
        return done.returncode == 0, (done.stderr.strip() or "netem works")
    finally:
        _ip("link", "del", name, check=False)


@dataclass
class Host:
    """One namespace host: its namespace, address, links and processes."""

    index: int
    namespace: str
    address: str
    inner: str  # the veth end inside the namespace
    outer: str  # the veth end on the bridge (its counters: what crossed the host's boundary)
    processes: list = field(default_factory=list)

    def exec(self, *command: str) -> list[str]:
        """``command`` run inside this host's namespace."""
        return ["ip", "netns", "exec", self.namespace, *command]


class NamespaceHosts:
    """A scheduler host and ``worker_hosts`` worker hosts, each a network namespace.

    Parameters
    ----------
    worker_hosts : int
        Hosts that run workers.
    workers_per_host : int
        ``dask worker`` processes per worker host (single-threaded each).
    rate : str, optional
        Bandwidth cap of every host's link, in ``tc`` units (``"1gbit"``,
        ``"100mbit"``); None: the veth's own speed.
    memory_limit : str
        Each worker's memory limit.
    env : dict, optional
        Extra environment of the Dask processes.
    dask : bool
        Start the scheduler and workers; False leaves the hosts bare, for
        other processes (:meth:`start`) to run in them, such as SSH servers.
    """

    def __init__(self, worker_hosts: int = 2, workers_per_host: int = 2, rate: str | None = None,
                 memory_limit: str = "2GiB", env: dict | None = None, dask: bool = True):
        self.dask = dask
        self.n_worker_hosts = worker_hosts
        self.workers_per_host = workers_per_host
        self.rate = rate
        self.memory_limit = memory_limit
        self.env = dict(env or {})
        # names and a subnet of this object's own (several may live in one process)
        n = next(_instances)
        self.tag = f"{PREFIX}{os.getpid()}{chr(97 + n % 26)}"
        self.bridge = f"{self.tag}br"
        self.hosts: list[Host] = []
        self.subnet = f"{_SUBNET}.{(os.getpid() + n) % 200 + 20}"
        self._logs: str | None = None

    # -- set-up ---------------------------------------------------------------------------
    def __enter__(self) -> NamespaceHosts:
        reason = unavailable()
        if reason:
            raise RuntimeError(f"Cannot build namespace hosts: {reason}.")
        remove_stale()
        try:
            self._build_network()
            self.set_rate(self.rate)
            if self.dask:
                self._start_scheduler()
                for host in self.worker_hosts:
                    self._start_workers(host)
                self._wait_for_workers(self.n_worker_hosts * self.workers_per_host)
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def scheduler_host(self) -> Host:
        """The host that runs the scheduler."""
        return self.hosts[0]

    @property
    def worker_hosts(self) -> list[Host]:
        """The hosts that run workers."""
        return self.hosts[1:]

    @property
    def scheduler_address(self) -> str:
        """The scheduler's address, reachable from the machine's namespace."""
        return f"tcp://{self.scheduler_host.address}:{_SCHEDULER_PORT}"

    def _build_network(self) -> None:
        _ip("link", "add", self.bridge, "type", "bridge")
        _ip("addr", "add", f"{self.subnet}.1/24", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        for i in range(self.n_worker_hosts + 1):
            host = Host(i, f"{self.tag}h{i}", f"{self.subnet}.{10 + i}", f"{self.tag}i{i}",
                        f"{self.tag}o{i}")
            self.hosts.append(host)
            _ip("netns", "add", host.namespace)
            _ip("link", "add", host.outer, "type", "veth", "peer", "name", host.inner)
            _ip("link", "set", host.inner, "netns", host.namespace)
            _ip("link", "set", host.outer, "master", self.bridge)
            _ip("link", "set", host.outer, "up")
            _ip("-n", host.namespace, "addr", "add", f"{host.address}/24", "dev", host.inner)
            _ip("-n", host.namespace, "link", "set", host.inner, "up")
            _ip("-n", host.namespace, "link", "set", "lo", "up")
            # a default route, as real hosts have: processes that find their own address
            # by routing (Dask's get_ip) find the host's, not 127.0.0.1
            _ip("-n", host.namespace, "route", "add", "default", "via", f"{self.subnet}.1")

    def set_rate(self, rate: str | None) -> None:
        """Cap every host's link at ``rate`` in both directions (None: lift the cap)."""
        self.rate = rate
        for host in self.hosts:
            for ns, dev in ((host.namespace, host.inner), (None, host.outer)):
                prefix = ["ip", "netns", "exec", ns] if ns else []
                subprocess.run([*prefix, "tc", "qdisc", "del", "dev", dev, "root"],
                               capture_output=True)
                if rate is not None:
                    subprocess.run([*prefix, "tc", "qdisc", "add", "dev", dev, "root", "tbf",
                                    "rate", rate, "burst", "256kb", "latency", "100ms"],
                                   check=True, capture_output=True, text=True)

    def start(self, host: Host, *command: str, env: dict | None = None) -> subprocess.Popen:
        """Start ``command`` in ``host``'s namespace, its stderr logged; stopped on close.

        ``env`` is added to this process's environment.
        """
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        # the processes log to files (a pipe nobody reads would block them once full)
        if self._logs is None:
            self._logs = tempfile.mkdtemp(prefix=f"{self.tag}-logs-")
        log = open(os.path.join(self._logs, f"h{host.index}-{len(host.processes)}.log"), "wb")
        with log:
            process = subprocess.Popen(host.exec(*command), env=env, stdout=subprocess.DEVNULL,
                                       stderr=log, start_new_session=True)
        process.log = log.name
        host.processes.append(process)
        return process

    def _spawn(self, host: Host, *args: str) -> subprocess.Popen:
        return self.start(host, sys.executable, *args, env={"OMP_NUM_THREADS": "1", **self.env})

    def _start_scheduler(self) -> None:
        host = self.scheduler_host
        self._spawn(host, "-m", "distributed.cli.dask_scheduler", "--host", host.address,
                    "--port", str(_SCHEDULER_PORT), "--no-dashboard", "--no-show")

    def _start_workers(self, host: Host) -> None:
        self._spawn(host, "-m", "distributed.cli.dask_worker", self.scheduler_address,
                    "--host", host.address, "--nworkers", str(self.workers_per_host),
                    "--nthreads", "1", "--memory-limit", self.memory_limit, "--no-dashboard",
                    "--name", f"host{host.index}")

    def _wait_for_workers(self, n: int, timeout: float = 60.0) -> None:
        from distributed import Client

        end = time.monotonic() + timeout
        while True:
            try:
                with Client(self.scheduler_address, timeout=5) as client:
                    client.wait_for_workers(n, timeout=max(end - time.monotonic(), 1))
                    return
            except (OSError, TimeoutError) as error:
                dead = [p for h in self.hosts for p in h.processes if p.poll() is not None]
                if dead or time.monotonic() > end:
                    raise RuntimeError(f"The namespace cluster did not start ({error}): "
                                       f"{self._stderr(dead)}") from None
                time.sleep(0.5)

    @staticmethod
    def _stderr(processes) -> str:
        out = []
        for p in processes:
            with contextlib.suppress(OSError), open(p.log, errors="replace") as f:
                out.append(f.read()[-2000:])
        return "\n".join(out)

    # -- during a run -----------------------------------------------------------------------
    def worker_addresses(self, client) -> dict[int, list[str]]:
        """The workers of each worker host (host index -> sorted worker addresses)."""
        workers = client.scheduler_info(n_workers=-1)["workers"]
        out: dict[int, list[str]] = {h.index: [] for h in self.worker_hosts}
        for address in workers:
            for h in self.worker_hosts:
                if f"//{h.address}:" in address:
                    out[h.index].append(address)
        return {k: sorted(v) for k, v in out.items()}

    def counters(self) -> dict[int, tuple[int, int]]:
        """Bytes each host's link carried so far: ``host index -> (into the host, out of it)``."""
        out = {}
        for host in self.hosts:
            base = f"/sys/class/net/{host.outer}/statistics"
            with open(f"{base}/tx_bytes") as f:  # the bridge side sends into the host
                into = int(f.read())
            with open(f"{base}/rx_bytes") as f:
                out_of = int(f.read())
            out[host.index] = (into, out_of)
        return out

    @staticmethod
    def bytes_since(before: dict, after: dict) -> dict[int, int]:
        """Bytes each host sent and received between two :meth:`counters` readings."""
        return {k: (after[k][0] - before[k][0]) + (after[k][1] - before[k][1]) for k in after}

    def kill_host(self, index: int) -> None:
        """Kill every Dask process of worker host ``index`` at once (``SIGKILL``), for good."""
        host = self.hosts[index]
        for process in host.processes:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
        # the worker processes the nannies started are in the same namespace: take them too
        for pid in _pids_in(host.namespace):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def pids_in(self, index: int) -> list[int]:
        """The processes running in host ``index``'s namespace."""
        return _pids_in(self.hosts[index].namespace)

    def link_down(self, index: int) -> None:
        """Take host ``index``'s link down (its processes live on, unreachable)."""
        _ip("link", "set", self.hosts[index].outer, "down")

    # -- tear-down --------------------------------------------------------------------------
    def close(self) -> None:
        """Stop every process and remove every namespace and link this object made."""
        for host in self.hosts:
            for process in host.processes:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + 5
        for host in self.hosts:
            for process in host.processes:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    process.wait(timeout=max(deadline - time.monotonic(), 0.1))
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    process.wait(timeout=5)
            _kill_all(_pids_in(host.namespace))
            _ip("netns", "del", host.namespace, check=False)
            _ip("link", "del", host.outer, check=False)
        _ip("link", "del", self.bridge, check=False)
        self.hosts = []
        if self._logs is not None:
            shutil.rmtree(self._logs, ignore_errors=True)
            self._logs = None


def _pids_in(namespace: str) -> list[int]:
    done = _ip("netns", "pids", namespace, check=False)
    return [int(p) for p in done.stdout.split()] if done.returncode == 0 else []


def remove_stale() -> list[str]:
    """Remove the namespaces and links of this module whose making process is gone.

    Their processes are killed first (a namespace lives on while a process
    is in it). Returns the names removed.
    """
    names = [n for n in _ip("netns", "list", check=False).stdout.split() if n.startswith(PREFIX)]
    links = re.findall(rf"\d+: ({PREFIX}\d+[a-z](?:br|o\d+))[:@]",
                       _ip("link", "show", check=False).stdout)
    stale = [n for n in names + links
             if not (re.match(rf"{PREFIX}(\d+)", n)
                     and _alive(int(re.match(rf"{PREFIX}(\d+)", n).group(1))))]
    for name in stale:
        if name in names:
            _kill_all(_pids_in(name))
            _ip("netns", "del", name, check=False)
    for name in stale:
        if name in links:
            _ip("link", "del", name, check=False)
    return stale


def _kill_all(pids: list[int], timeout: float = 5.0) -> None:
    """``SIGKILL`` the processes and wait (up to ``timeout``) until they are gone."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    end = time.monotonic() + timeout
    while any(os.path.exists(f"/proc/{pid}") for pid in pids) and time.monotonic() < end:
        time.sleep(0.05)


def _alive(pid: int) -> bool:
    """Whether the process ``pid`` (the one that made a namespace) is running."""
    return os.path.exists(f"/proc/{pid}")
