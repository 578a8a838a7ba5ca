"""A cluster spec: finding it by name, reading, overriding and validating it.

:func:`load_cluster_spec` returns a :class:`ClusterSpec`, whose
:meth:`~ClusterSpec.dry_run` and :meth:`~ClusterSpec.connect` hand the work
to the spec's back end (:mod:`.backends`).
"""

from __future__ import annotations

import contextlib
import copy
import os
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from dask.utils import parse_timedelta

from .._compat import workers as cluster_workers
from ..schema_errors import best_error, describe, show
from .backends import BACKENDS
from .errors import ClusterSpecError, display
from .scaling import check_scaling, scaling_text
from .schema import FORMATS

#: The spec used when none is named: an embedded local cluster.
DEFAULT_SPEC = "local"

#: The shipped specs, packaged with daskdist.
PACKAGED_SPECS = Path(__file__).parents[1] / "cluster_specs"

#: How long :meth:`ClusterSpec.connect` waits for workers when neither it nor the spec says.
DEFAULT_TIMEOUT = 120.0


@dataclass
class ClusterSpec:
    """A validated cluster spec; make one with :func:`load_cluster_spec`.

    Attributes
    ----------
    name : str
        The spec's name: its file name without ``.yaml``.
    path : pathlib.Path
        The file it was read from.
    data : dict
        The validated contents, overrides applied.
    dashboard_link : str or None
        The cluster's dashboard while :meth:`connect` is open, else None.
    """

    name: str
    path: Path
    data: dict
    dashboard_link: str | None = field(default=None, init=False, compare=False)

    @property
    def backend(self) -> str:
        """The back end that starts the cluster (``local``, ``slurm``, …)."""
        return self.data["backend"]

    def dry_run(self) -> str:
        """Describe what :meth:`connect` would start, without starting anything.

        Returns
        -------
        str
            The scaling and waiting policy, then, by back end: the
            :class:`~distributed.LocalCluster` options (``local``,
            ``local-cuda``), the hosts and the commands run on them (``ssh``),
            the rendered job script with the scheduler address left as
            ``{scheduler}`` (``slurm``, ``pbs``; nothing is created, not even
            the ``log_directory``), the ``DaskCluster``
            resource as YAML (``kubernetes``), or the address (``address``).

        Raises
        ------
        ImportError
            When rendering needs an optional package that is not installed
            (dask-jobqueue for ``slurm`` and ``pbs``, dask-kubernetes for
            ``kubernetes``).
        """
        backend = BACKENDS[self.backend]
        header = [f"# cluster spec {self.name!r} ({display(self.path)}), backend {self.backend}",
                  f"# scaling: {scaling_text(self, backend)}"]
        waits = backend.expected_workers(self, None)
        if waits:
            header.append(f"# waits up to {_seconds(self._timeout(None))} for {waits} worker(s)")
        return "\n".join(header) + "\n" + backend.describe(self).rstrip() + "\n"

    @contextlib.contextmanager
    def connect(self, timeout: float | str | None = None):
        """Start the cluster (or connect to it) and yield a client for it.

        Scales it to ``workers`` or turns on adaptive scaling, then waits for
        at least the number of workers the spec starts with. The client, and
        a cluster this call started, are closed on exit.

        Parameters
        ----------
        timeout : float or str, optional
            Longest wait for the workers (seconds, or a duration such as
            ``"10 minutes"``); default the spec's ``timeout``, else 120 s.

        Yields
        ------
        distributed.Client
            Not set as the default client: pass it on explicitly.

        Raises
        ------
        ImportError
            When the back end needs an optional package that is not
            installed; the message says which extra to install.
        ClusterSpecError
            When a TLS file the spec names does not exist.
        TimeoutError
            When fewer workers than expected arrive within ``timeout``.
        """
        backend = BACKENDS[self.backend]
        seconds = self._timeout(timeout)
        backend.check_installed(self)
        cluster = backend.start(self)
        try:
            client = backend.client(self, cluster, seconds)
            try:
                self._wait_for_workers(backend, client, cluster, seconds)
                self.dashboard_link = client.dashboard_link
                yield client
            finally:
                self.dashboard_link = None
                client.close()
        finally:
            if cluster is not None:
                cluster.close()

    def _timeout(self, timeout) -> float:
        if timeout is None:
            timeout = self.data.get("timeout")
        return parse_timedelta(timeout if timeout is not None else DEFAULT_TIMEOUT)

    def _wait_for_workers(self, backend, client, cluster, seconds: float) -> None:
        expected = backend.expected_workers(self, cluster)
        if not expected:
            return
        try:
            client.wait_for_workers(expected, timeout=seconds)
        except TimeoutError as error:
            arrived = len(cluster_workers(client))
            raise TimeoutError(
                f"{display(self.path)}: only {arrived} of {expected} worker(s) connected within "
                f"{_seconds(seconds)}{backend.hint(self, cluster)}; raise the spec's timeout or "
                f"connect(timeout=...) if they are slow to start"
            ) from error


def load_cluster_spec(name: str | os.PathLike = DEFAULT_SPEC,
                      overrides: dict | None = None) -> ClusterSpec:
    """Find, read and validate a cluster spec.

    Parameters
    ----------
    name : str or path-like
        A path to a ``.yaml`` file, or a spec name: ``./cluster_specs/NAME.yaml``
        when the working directory has one, else the shipped spec of that name.
    overrides : dict, optional
        Dotted keys and the values to set before validation, e.g.
        ``{"workers": 3, "jobqueue.queue": "gpu"}``; None sets a key to null
        (``{"workers": 3, "adapt": None}`` replaces adaptive scaling).

    Returns
    -------
    ClusterSpec

    Raises
    ------
    ClusterSpecError
        When there is no such spec, it is not valid YAML, or it does not
        match its back end's schema; the message names the file and field.
    """
    path = _resolve(name)
    where = display(path)
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ClusterSpecError(f"{where}: not valid YAML: {' '.join(str(error).split())}") from None
    overrides = dict(overrides or {})
    data = _apply_overrides(data, overrides, where)
    _validate(data, where, overrides)
    return ClusterSpec(name=path.stem, path=path, data=data)


def _resolve(name) -> Path:
    text = os.fspath(name)
    candidate = Path(text).expanduser()
    if candidate.suffix in (".yaml", ".yml") or "/" in text or os.sep in text:
        if not candidate.is_file():
            raise ClusterSpecError(f"{text}: no such cluster spec file")
        return candidate
    for directory in (Path.cwd() / "cluster_specs", PACKAGED_SPECS):
        path = directory / f"{text}.yaml"
        if path.is_file():
            return path
    shipped = ", ".join(sorted(p.stem for p in PACKAGED_SPECS.glob("*.yaml")))
    raise ClusterSpecError(f"{text}: no cluster spec of that name: not a .yaml file, not in "
                           f"./cluster_specs, not one of the shipped specs ({shipped})")


def _apply_overrides(data, overrides: dict, where: str):
    if not overrides:
        return data
    if not isinstance(data, dict):
        return data  # validation reports it
    data = copy.deepcopy(data)
    for key, value in overrides.items():
        *parents, last = str(key).split(".")
        node = data
        for depth, part in enumerate(parents):
            if node.get(part) is None:
                node[part] = {}
            node = node[part]
            if not isinstance(node, dict):
                field_ = ".".join(parents[:depth + 1])
                raise ClusterSpecError(f"{where}: {field_}: expected a mapping to set override "
                                       f"{key!r} in, got {show(node)}")
        node[last] = value
    return data


def _validate(data, where: str, overrides: dict) -> None:
    """Check the ``backend`` first, then the rest against that back end's schema."""
    names = {"type": "object", "expected": "a mapping of keys such as 'backend: local'",
             "required": ["backend"], "properties": {"backend": {"enum": sorted(BACKENDS)}}}
    _raise_first_error(names, data, where, overrides)
    backend = BACKENDS[data["backend"]]
    _raise_first_error(backend.schema(), data, where, overrides,
                       scope=f"backend {backend.name!r}")
    check_scaling(data, where, backend)


def _raise_first_error(schema: dict, data, where: str, overrides: dict, scope=None) -> None:
    error = best_error(schema, data, format_checker=FORMATS)
    if error is not None:
        field_, problem = describe(error, scope=scope)
        note = " (from overrides)" if field_ in overrides else ""
        raise ClusterSpecError(f"{where}: {field_}{note}: {problem}")


def _seconds(seconds: float) -> str:
    return f"{seconds:g} s"
