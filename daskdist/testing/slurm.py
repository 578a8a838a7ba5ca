"""A single-node Slurm cluster on this machine, to try and test the ``slurm`` cluster spec.

``make slurm-up`` and ``make slurm-down`` run this module
(``python -m daskdist.testing.slurm up`` / ``down``); the test suite uses
:class:`LocalSlurm` as a context manager. What it does:

- installs Debian's ``slurmctld``, ``slurmd``, ``slurm-client`` and ``munge``
  with ``apt-get`` when ``slurmctld`` is missing;
- writes ``/etc/slurm/slurm.conf`` (the path ``sbatch``, ``squeue`` and
  ``scancel`` read when ``SLURM_CONF`` is not set) for one node, this machine,
  with its real cores and 90% of its memory, one partition ``local``,
  ``proctrack/linuxproc`` and ``task/none`` (no cgroups, no systemd);
- starts ``munged`` (unless one runs already), ``slurmctld`` and ``slurmd``,
  their state, spool, logs and pid files under ``/var/lib/daskdist-slurm``,
  and waits until the node takes jobs.

Stopping cancels the jobs left, stops what it started, and removes the
``slurm.conf`` and the state folder it wrote; the packages stay installed.
It never overwrites a ``slurm.conf`` it did not write, and refuses to start
beside a ``slurmctld`` it did not start. Needs root (installing, ``/etc``).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

__all__ = ["LocalSlurm", "unavailable", "PACKAGES"]

#: Debian packages that make a single-node Slurm cluster.
PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
CONF = Path("/etc/slurm/slurm.conf")
STATE = Path("/var/lib/daskdist-slurm")
#: First line of every slurm.conf this module writes; only such a file is replaced or removed.
MARK = "# Written by daskdist.testing.slurm (make slurm-up); make slurm-down removes it."
_MUNGE_STARTED = "munged-started-here"


def _missing_commands() -> list[str]:
    return [c for c in ("slurmctld", "slurmd", "sbatch", "squeue", "scancel", "munged")
            if shutil.which(c) is None and not Path("/usr/sbin", c).exists()]


def unavailable(install: bool = False) -> str | None:
    """Why a local Slurm cluster cannot run here (None: it can).

    Parameters
    ----------
    install : bool
        Install the missing packages with ``apt-get`` first.
    """
    if not sys.platform.startswith("linux"):
        return "Slurm runs on Linux only"
    if os.geteuid() != 0:
        return "a local Slurm cluster needs root (it installs packages and writes /etc/slurm)"
    if _missing_commands() and install:
        error = install_packages()
        if error:
            return error
    missing = _missing_commands()
    if missing:
        return (f"Slurm is not installed (missing {', '.join(missing)}): "
                f"apt-get install {' '.join(PACKAGES)}")
    return None


def install_packages() -> str | None:
    """Install :data:`PACKAGES` with ``apt-get``; returns why that failed, or None."""
    if shutil.which("apt-get") is None:
        return "Slurm is not installed and there is no apt-get to install it with"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *PACKAGES]
    done = subprocess.run(install, env=env, capture_output=True, text=True)
    if done.returncode != 0:  # the package lists may be missing or stale
        subprocess.run(["apt-get", "update", "-qq"], env=env, capture_output=True)
        done = subprocess.run(install, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        return f"apt-get could not install {' '.join(PACKAGES)}: {done.stderr.strip()[-500:]}"
    return None


def _sbin(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


def _pid(path: Path) -> int | None:
    with contextlib.suppress(OSError, ValueError):
        pid = int(path.read_text().split()[0])
        if Path(f"/proc/{pid}").exists():
            return pid
    return None


def node_hardware() -> dict[str, int]:
    """This machine as ``slurmd -C`` sees it: ``CPUs``, ``RealMemory`` (MB) and the layout."""
    done = subprocess.run([_sbin("slurmd"), "-C"], capture_output=True, text=True, check=True)
    found = dict(re.findall(r"(\w+)=(\d+)", done.stdout.splitlines()[0]))
    keys = ("CPUs", "Boards", "SocketsPerBoard", "CoresPerSocket", "ThreadsPerCore",
            "RealMemory")
    return {key: int(found[key]) for key in keys if key in found}


class LocalSlurm:
    """One Slurm node (this machine) with its controller; see the module's text.

    Parameters
    ----------
    conf : path-like
        Where ``slurm.conf`` goes; anything but the default needs
        ``SLURM_CONF`` set for the Slurm commands, which :meth:`up` does in
        this process.
    state : path-like
        The folder of the daemons' state, spool, logs and pid files.
    timeout : float
        Longest wait, in seconds, for the node to take jobs.

    Examples
    --------
    >>> with LocalSlurm() as slurm:          # doctest: +SKIP
    ...     print(slurm.node, slurm.cpus)     # then SLURMCluster(...) submits real jobs
    """

    def __init__(self, conf: str | os.PathLike = CONF, state: str | os.PathLike = STATE,
                 timeout: float = 60.0):
        self.conf = Path(conf)
        self.state = Path(state)
        self.timeout = timeout
        self.node = socket.gethostname().split(".")[0]
        self.cpus = 0
        self._reused = False

    # -- status ------------------------------------------------------------------------
    def _ours(self) -> bool:
        with contextlib.suppress(OSError):
            return self.conf.read_text().startswith(MARK)
        return False

    def running(self) -> bool:
        """Whether this module's controller and node daemon are running."""
        return (self._ours() and _pid(self.state / "slurmctld.pid") is not None
                and _pid(self.state / "slurmd.pid") is not None)

    def env(self) -> dict:
        """The environment of the Slurm commands (``SLURM_CONF`` when not the default)."""
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def jobs(self) -> list[tuple[str, str, str]]:
        """The queue: ``(job id, state, reason)`` of each job."""
        done = subprocess.run(["squeue", "-h", "-o", "%i %T %r"], capture_output=True,
                              text=True, env=self.env())
        return [tuple(line.split(None, 2)) for line in done.stdout.splitlines() if line.strip()]

    # -- start -------------------------------------------------------------------------
    def up(self) -> LocalSlurm:
        """Install what is missing, write the configuration, start the daemons and wait.

        Raises
        ------
        RuntimeError
            When Slurm cannot run here, another ``slurm.conf`` or controller
            is in the way, or the node does not take jobs in time; the
            message says which, with the end of the daemons' logs.
        """
        if self.running():
            self.cpus = node_hardware()["CPUs"]
            return self
        reason = unavailable(install=True)
        if reason:
            raise RuntimeError(f"Cannot start a local Slurm cluster: {reason}.")
        if self.conf.exists() and not self._ours():
            raise RuntimeError(f"{self.conf} exists and was not written by daskdist: a Slurm "
                               f"cluster is configured on this machine already; use it, or "
                               f"move that file away first")
        if subprocess.run(["pgrep", "-x", "slurmctld"], capture_output=True).returncode == 0:
            raise RuntimeError("a slurmctld that daskdist did not start is running: stop it first")
        if self.conf != CONF:
            os.environ["SLURM_CONF"] = str(self.conf)
        try:
            self._write_conf()
            self._start_munge()
            for daemon in ("slurmctld", "slurmd"):
                # the daemons fork into the background and write their pid files
                subprocess.run([_sbin(daemon), "-f", str(self.conf)], check=True,
                               capture_output=True, text=True, env=self.env())
            self._wait_until_idle()
        except BaseException as error:
            logs = self._logs()
            self.down()
            if isinstance(error, subprocess.CalledProcessError):
                raise RuntimeError(f"{error.cmd[0]} did not start: {error.stderr.strip()}\n"
                                   f"{logs}") from None
            raise
        return self

    def _write_conf(self) -> None:
        hardware = node_hardware()
        self.cpus = hardware["CPUs"]
        hardware["RealMemory"] = int(hardware["RealMemory"] * 0.9)
        node = " ".join(f"{key}={value}" for key, value in hardware.items())
        for sub in ("ctld", "spool"):
            (self.state / sub).mkdir(parents=True, exist_ok=True)
        s = self.state
        lines = [
            MARK,
            "ClusterName=daskdist-local",
            f"SlurmctldHost={self.node}(127.0.0.1)",
            "SlurmUser=root", "SlurmdUser=root",
            "AuthType=auth/munge", "CredType=cred/munge",
            "MpiDefault=none",
            "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "SchedulerType=sched/backfill",
            "SelectType=select/cons_tres", "SelectTypeParameters=CR_Core_Memory",
            "ReturnToService=2",
            "KillWait=10",  # scancel: SIGTERM, then SIGKILL 10 s later
            "MinJobAge=60",
            f"StateSaveLocation={s / 'ctld'}", f"SlurmdSpoolDir={s / 'spool'}",
            f"SlurmctldPidFile={s / 'slurmctld.pid'}", f"SlurmdPidFile={s / 'slurmd.pid'}",
            f"SlurmctldLogFile={s / 'slurmctld.log'}", f"SlurmdLogFile={s / 'slurmd.log'}",
            f"NodeName={self.node} NodeAddr=127.0.0.1 {node} State=UNKNOWN",
            "PartitionName=local Nodes=ALL Default=YES MaxTime=INFINITE State=UP",
        ]
        self.conf.parent.mkdir(parents=True, exist_ok=True)
        self.conf.write_text("\n".join(lines) + "\n")

    def _start_munge(self) -> None:
        if subprocess.run(["pgrep", "-x", "munged"], capture_output=True).returncode == 0:
            return
        run = Path("/run/munge")
        run.mkdir(parents=True, exist_ok=True)
        for folder in (run, Path("/var/lib/munge"), Path("/var/log/munge")):
            folder.mkdir(parents=True, exist_ok=True)
            shutil.chown(folder, "munge", "munge")
        if not Path("/etc/munge/munge.key").exists():  # Debian's package makes one
            subprocess.run(["runuser", "-u", "munge", "--", _sbin("mungekey"), "-c"],
                           check=True, capture_output=True, text=True)
        subprocess.run(["runuser", "-u", "munge", "--", _sbin("munged")], check=True,
                       capture_output=True, text=True)
        (self.state / _MUNGE_STARTED).touch()

    def _wait_until_idle(self) -> None:
        end = time.monotonic() + self.timeout
        state = ""
        while time.monotonic() < end:
            done = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], capture_output=True,
                                  text=True, env=self.env())
            state = done.stdout.strip() or done.stderr.strip()
            if state in ("idle", "mixed", "allocated"):
                return
            time.sleep(0.5)
        raise RuntimeError(f"the Slurm node did not take jobs within {self.timeout:g} s "
                           f"(sinfo: {state!r})\n{self._logs()}")

    def _logs(self) -> str:
        out = []
        for name in ("slurmctld.log", "slurmd.log"):
            with contextlib.suppress(OSError):
                tail = (self.state / name).read_text(errors="replace").splitlines()[-15:]
                out.append(f"--- {name}\n" + "\n".join(tail))
        return "\n".join(out)

    # -- stop --------------------------------------------------------------------------
    def down(self) -> None:
        """Cancel the jobs left, stop the daemons started here, remove what was written."""
        if not self._ours():
            return
        if _pid(self.state / "slurmctld.pid") is not None:
            subprocess.run(["scancel", "--full", "--partition", "local"], capture_output=True,
                           env=self.env())
        for name in ("slurmd", "slurmctld"):
            self._stop(self.state / f"{name}.pid")
        if (self.state / _MUNGE_STARTED).exists():
            self._stop(Path("/run/munge/munged.pid"))
        self.conf.unlink(missing_ok=True)
        shutil.rmtree(self.state, ignore_errors=True)

    @staticmethod
    def _stop(pidfile: Path, timeout: float = 10.0) -> None:
        pid = _pid(pidfile)
        if pid is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        end = time.monotonic() + timeout
        while Path(f"/proc/{pid}").exists() and time.monotonic() < end:
            time.sleep(0.1)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)

    # -- context manager: stops only what it started ------------------------------------
    def __enter__(self) -> LocalSlurm:
        self._reused = self.running()
        return self.up()

    def __exit__(self, *exc) -> None:
        if not self._reused:
            self.down()


def main(argv=None) -> int:
    """``python -m daskdist.testing.slurm up|down|status``; returns the exit code."""
    parser = argparse.ArgumentParser(prog="python -m daskdist.testing.slurm",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=("up", "down", "status"))
    args = parser.parse_args(argv)
    slurm = LocalSlurm()
    try:
        if args.action == "up":
            slurm.up()
            print(f"Slurm is up: node {slurm.node} ({slurm.cpus} CPUs), partition 'local'; "
                  f"try: daskdist run pipelines/digits-mlp.yaml --cluster slurm")
        elif args.action == "down":
            slurm.down()
            print("Slurm is down; its configuration and state are removed")
        else:
            print("running" if slurm.running() else "not running")
            for job in slurm.jobs() if slurm.running() else []:
                print(" ".join(job))
    except RuntimeError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
