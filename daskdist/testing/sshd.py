"""OpenSSH servers on namespace hosts, to run the ``ssh`` cluster spec for real.

:class:`SSHServers` starts ``sshd`` in every host of a
:class:`~daskdist.testing.hosts.NamespaceHosts` built with ``dask=False``,
with a host key, a client key and a ``known_hosts`` file made for it alone in
a private temporary folder; it accepts only that client key, and removes
everything on exit. Example::

    with NamespaceHosts(worker_hosts=2, dask=False) as hosts, SSHServers(hosts) as ssh:
        spec = {"backend": "ssh", "ssh": {"hosts": ssh.addresses,
                                          "connect_options": ssh.connect_options()}}

Needs OpenSSH's server (Debian's ``openssh-server``) and ``ssh-keygen``;
:func:`unavailable` says why not, for tests to skip with.
"""

from __future__ import annotations

import contextlib
import getpass
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from .hosts import NamespaceHosts

__all__ = ["SSHServers", "unavailable"]

PRIVSEP = Path("/run/sshd")  # sshd refuses to start without its privilege separation folder


def _sshd() -> str | None:
    return shutil.which("sshd") or next(
        (str(p) for p in (Path("/usr/sbin/sshd"),) if p.exists()), None)


def unavailable() -> str | None:
    """Why SSH servers cannot run in namespace hosts here (None: they can)."""
    if _sshd() is None:
        return "OpenSSH's server is not installed (apt-get install openssh-server)"
    if shutil.which("ssh-keygen") is None:
        return "ssh-keygen is not installed (apt-get install openssh-client)"
    try:
        import asyncssh  # noqa: F401 - SSHCluster's client
    except ImportError:
        return "asyncssh is not installed: pip install 'daskdist[ssh]'"
    return None


class SSHServers:
    """``sshd`` on port 22 of each host of ``hosts``, for this object's client key only.

    Parameters
    ----------
    hosts : NamespaceHosts
        Built, with ``dask=False``; the servers are its processes, stopped by
        its ``close`` too.
    timeout : float
        Longest wait, in seconds, for every server to accept connections.

    Attributes
    ----------
    addresses : list of str
        Each host's address, the scheduler's host first.
    """

    def __init__(self, hosts: NamespaceHosts, timeout: float = 30.0):
        self.hosts = hosts
        self.timeout = timeout
        self.addresses = [host.address for host in hosts.hosts]
        self.folder: Path | None = None
        self._processes: list = []
        self._made_privsep = False

    @property
    def client_key(self) -> Path:
        """The private key the servers accept."""
        return self.folder / "client_key"

    @property
    def known_hosts(self) -> Path:
        """A ``known_hosts`` file naming every server's host key."""
        return self.folder / "known_hosts"

    def connect_options(self) -> dict:
        """``asyncssh.connect`` options that log in to every server, host keys checked."""
        return {"known_hosts": str(self.known_hosts), "client_keys": [str(self.client_key)],
                "username": getpass.getuser()}

    def __enter__(self) -> SSHServers:
        reason = unavailable()
        if reason:
            raise RuntimeError(f"Cannot start SSH servers: {reason}.")
        self.folder = Path(tempfile.mkdtemp(prefix="daskdist-sshd-"))
        try:
            self._make_keys()
            if not PRIVSEP.exists():
                PRIVSEP.mkdir(mode=0o755, parents=True)
                self._made_privsep = True
            for host in self.hosts.hosts:
                config = self._write_config(host.index, host.address)
                self._processes.append(self.hosts.start(host, _sshd(), "-D", "-e", "-f",
                                                        str(config)))
            self._wait()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _make_keys(self) -> None:
        for name in ("host_key", "client_key"):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "daskdist-test",
                            "-f", str(self.folder / name)], check=True, capture_output=True)
        (self.folder / "authorized_keys").write_text(
            (self.folder / "client_key.pub").read_text())
        host_key = (self.folder / "host_key.pub").read_text().split()[:2]
        self.known_hosts.write_text("".join(f"{address} {' '.join(host_key)}\n"
                                            for address in self.addresses))

    def _write_config(self, index: int, address: str) -> Path:
        lines = [f"ListenAddress {address}", "Port 22",
                 f"HostKey {self.folder / 'host_key'}",
                 f"AuthorizedKeysFile {self.folder / 'authorized_keys'}",
                 f"PidFile {self.folder / f'sshd-{index}.pid'}",
                 "PermitRootLogin prohibit-password", "PubkeyAuthentication yes",
                 "PasswordAuthentication no", "KbdInteractiveAuthentication no",
                 "UsePAM no", "StrictModes no", "PrintMotd no", "MaxStartups 100",
                 "MaxSessions 100"]
        path = self.folder / f"sshd-{index}.conf"
        path.write_text("\n".join(lines) + "\n")
        return path

    def _wait(self) -> None:
        end = time.monotonic() + self.timeout
        for address, process in zip(self.addresses, self._processes):
            while True:
                with contextlib.suppress(OSError), socket.create_connection((address, 22), 1):
                    break
                if process.poll() is not None or time.monotonic() > end:
                    log = ""
                    with contextlib.suppress(OSError):
                        log = Path(process.log).read_text(errors="replace")[-1500:]
                    raise RuntimeError(f"sshd on {address} did not start: {log}")
                time.sleep(0.1)

    def close(self) -> None:
        """Stop the servers and remove the keys and configuration."""
        for process in self._processes:
            with contextlib.suppress(ProcessLookupError):
                process.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=5)
        self._processes = []
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)
            self.folder = None
        if self._made_privsep:
            with contextlib.suppress(OSError):
                os.rmdir(PRIVSEP)
            self._made_privsep = False
