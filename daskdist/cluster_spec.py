"""Cluster specs: YAML files that say which Dask cluster a fit runs on.

A spec names a ``backend`` and gives that back end's options in a section of
its own; :func:`load_cluster_spec` reads and validates one before anything
starts, :meth:`ClusterSpec.dry_run` shows what would be started, and
:meth:`ClusterSpec.connect` starts it (or connects to it) and yields a client.

=============  ==============================================  ==============
backend        what starts                                     options in
=============  ==============================================  ==============
``local``      :func:`daskdist.clients.embedded_cluster`       ``local``
``local-cuda`` ``dask_cuda.LocalCUDACluster``, one worker/GPU  ``cuda``
``ssh``        :func:`distributed.deploy.ssh.SSHCluster`       ``ssh``
``slurm``      ``dask_jobqueue.SLURMCluster``                  ``jobqueue``
``pbs``        ``dask_jobqueue.PBSCluster``                    ``jobqueue``
``kubernetes`` ``dask_kubernetes.operator.KubeCluster``        ``kubernetes``
``address``    nothing: connects to the scheduler ``address``  (top level)
=============  ==============================================  ==============

Keys shared by the back ends: ``workers: N`` starts a fixed number of workers
(``cluster.scale(N)``); ``adapt: {minimum, maximum}`` lets Dask's adaptive
scaling add workers under load and retire idle ones gracefully (their data
moves to the others first); ``timeout`` bounds the wait for the first workers;
``tls`` encrypts the cluster's connections, ``true`` with throw-away
certificates, or ``{ca_file, cert, key}`` with your own.

Spec names resolve to a file in this order: a path to a ``.yaml`` file; then
``./cluster_specs/NAME.yaml`` in the working directory; then the copy of the
shipped spec packaged with daskdist (``daskdist/cluster_specs/``).
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import importlib
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import dask.config
import jsonschema
import yaml
from dask.utils import parse_bytes, parse_timedelta
from distributed import Client

__all__ = ["DEFAULT_SPEC", "ClusterSpec", "ClusterSpecError", "load_cluster_spec"]

#: The spec used when none is named: an embedded local cluster.
DEFAULT_SPEC = "local"

#: The shipped specs, packaged with daskdist.
PACKAGED_SPECS = Path(__file__).with_name("cluster_specs")

#: How long :meth:`ClusterSpec.connect` waits for workers when neither it nor the spec says.
DEFAULT_TIMEOUT = 120.0

#: Placeholder for the scheduler address in rendered job scripts and commands.
SCHEDULER_PLACEHOLDER = "{scheduler}"


class ClusterSpecError(ValueError):
    """A cluster spec that cannot be found, read or validated.

    The message is one line: the file, the field (a dotted path) and what was
    expected, e.g. ``cluster_specs/slurm.yaml: jobqueue.cores: expected an
    integer >= 1, got 'four'``.
    """


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
            ``{scheduler}`` (``slurm``, ``pbs``; dask-jobqueue creates a
            ``log_directory`` that does not exist yet), the ``DaskCluster``
            resource as YAML (``kubernetes``), or the address (``address``).

        Raises
        ------
        ImportError
            When rendering needs an optional package that is not installed
            (dask-jobqueue for ``slurm`` and ``pbs``, dask-kubernetes for
            ``kubernetes``).
        """
        backend = _BACKENDS[self.backend]
        header = [f"# cluster spec {self.name!r} ({_display(self.path)}), backend {self.backend}",
                  f"# scaling: {_scaling_text(self)}"]
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
        backend = _BACKENDS[self.backend]
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
            arrived = len(client.scheduler_info(n_workers=-1)["workers"])
            raise TimeoutError(
                f"{_display(self.path)}: only {arrived} of {expected} worker(s) connected within "
                f"{_seconds(seconds)}{backend.hint(self)}; raise the spec's timeout or "
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
    where = _display(path)
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ClusterSpecError(f"{where}: not valid YAML: {' '.join(str(error).split())}") from None
    overrides = dict(overrides or {})
    data = _apply_overrides(data, overrides, where)
    _validate(data, where, overrides)
    return ClusterSpec(name=path.stem, path=path, data=data)


# --- finding and reading ---------------------------------------------------


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


def _display(path: Path) -> str:
    """The path relative to the working directory when it lies inside it."""
    relative = os.path.relpath(os.path.abspath(path))
    return str(path) if relative.startswith("..") else relative


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
                                       f"{key!r} in, got {_show(node)}")
        node[last] = value
    return data


# --- validation ------------------------------------------------------------

_STRING = {"type": "string", "description": "a string"}
_STRINGS = {"type": "array", "items": _STRING, "description": "a list of strings"}
_MAPPING = {"type": "object", "description": "a mapping"}
_BOOL = {"type": "boolean", "description": "true or false"}
_COUNT = {"type": "integer", "minimum": 1, "description": "an integer >= 1"}
_SIZE = {"type": "string", "format": "size", "description": "a size such as '16GB'"}
_MEMORY_LIMIT = {"type": ["string", "number"],
                 "description": "a size such as '4GB', a fraction of the memory, or 'auto'"}
_DURATION = {"type": ["string", "number"], "format": "duration",
             "description": "a duration such as 90, '90s' or '10 minutes'"}
_TLS_FILES = {
    "type": "object",
    "description": "a mapping with ca_file, cert and key",
    "properties": {
        "ca_file": {**_STRING, "description": "the path of the CA certificate (PEM)"},
        "cert": {**_STRING, "description": "the path of the certificate (PEM)"},
        "key": {"type": ["string", "null"],
                "description": "the path of the private key (PEM), or null when cert holds it"},
    },
    "required": ["ca_file", "cert"],
    "additionalProperties": False,
}
_ADAPT = {
    "type": ["object", "null"],
    "description": "a mapping with minimum and maximum, or null",
    "properties": {"minimum": _COUNT, "maximum": _COUNT},
    "required": ["minimum", "maximum"],
    "additionalProperties": False,
}


def _nullable(schema: dict) -> dict:
    types = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
    nullable = {**schema, "type": [*types, "null"],
                "description": schema["description"] + " or null"}
    if "enum" in schema:
        nullable["enum"] = [*schema["enum"], None]
    return nullable


def _sections(options: dict, required=()) -> dict:
    """The schema of a back end's section; options not required may be null."""
    properties = {key: value if key in required else _nullable(value)
                  for key, value in options.items()}
    return {"type": "object", "description": "a mapping", "properties": properties,
            "required": list(required), "additionalProperties": False}


_FORMATS = jsonschema.FormatChecker(formats=())


@_FORMATS.checks("size", raises=(ValueError, KeyError))
def _is_size(value) -> bool:
    return not isinstance(value, str) or parse_bytes(value) >= 0


@_FORMATS.checks("duration", raises=(ValueError, KeyError))
def _is_duration(value) -> bool:
    return not isinstance(value, str) or parse_timedelta(value) >= 0


# YAML's 4.0 is not a worker count: "integer" means int only (and never bool).
_Validator = jsonschema.validators.extend(
    jsonschema.Draft202012Validator,
    type_checker=jsonschema.Draft202012Validator.TYPE_CHECKER.redefine(
        "integer", lambda checker, value: isinstance(value, int) and not isinstance(value, bool)),
)


def _validate(data, where: str, overrides: dict) -> None:
    if not isinstance(data, dict):
        raise ClusterSpecError(f"{where}: expected a mapping of keys such as 'backend: local', "
                               f"got {_show(data)}")
    backends = sorted(_BACKENDS)
    if "backend" not in data:
        raise ClusterSpecError(f"{where}: backend: missing; expected one of "
                               f"{', '.join(map(repr, backends))}")
    backend = _BACKENDS.get(data["backend"]) if isinstance(data["backend"], str) else None
    if backend is None:
        raise ClusterSpecError(f"{where}: backend: expected one of "
                               f"{', '.join(map(repr, backends))}, got {_show(data['backend'])}")
    validator = _Validator(backend.schema(), format_checker=_FORMATS)
    error = jsonschema.exceptions.best_match(validator.iter_errors(data))
    if error is not None:
        field_, problem = _describe_error(error, backend)
        note = " (from overrides)" if field_ in overrides else ""
        raise ClusterSpecError(f"{where}: {field_}{note}: {problem}")
    _check_scaling(data, where, backend)


def _dotted(path) -> str:
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else f".{part}" if text else str(part)
    return text


def _describe_error(error, backend) -> tuple[str, str]:
    """``(field, what was expected)`` for one jsonschema error."""
    path = list(error.absolute_path)
    if error.validator == "additionalProperties":
        known = sorted(error.schema.get("properties", {}))
        unknown = sorted(k for k in error.instance if k not in known)[0]
        close = difflib.get_close_matches(unknown, known, n=1)
        guess = f" (did you mean {close[0]!r}?)" if close else ""
        scope = f" for backend {backend.name!r}" if not path else ""
        return _dotted([*path, unknown]), (f"unknown key{scope}{guess}; "
                                           f"expected one of {', '.join(known)}")
    if error.validator == "required":
        missing = next(k for k in error.validator_value if k not in error.instance)
        schema = error.schema.get("properties", {}).get(missing, {})
        return _dotted([*path, missing]), f"missing; expected {_expected(schema)}"
    return _dotted(path) or "(top level)", (f"expected {_expected(error.schema)}, "
                                            f"got {_show(error.instance)}")


def _expected(schema: dict) -> str:
    if "description" in schema:
        return schema["description"]
    if "enum" in schema:
        return "one of " + ", ".join(_show(v) for v in schema["enum"])
    return "a value"


def _show(value) -> str:
    """A value as a user wrote it in YAML."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return repr(value)


def _check_scaling(data: dict, where: str, backend) -> None:
    adapt = data.get("adapt")
    if adapt is not None:
        if data.get("workers") is not None:
            raise ClusterSpecError(f"{where}: workers: give either workers (a fixed number) or "
                                   f"adapt (minimum and maximum), not both; set the other to null")
        if adapt["maximum"] < adapt["minimum"]:
            raise ClusterSpecError(f"{where}: adapt.maximum: expected an integer >= adapt.minimum "
                                   f"({adapt['minimum']}), got {adapt['maximum']}")
    elif backend.scaling == "required" and data.get("workers") is None:
        raise ClusterSpecError(f"{where}: workers: missing; expected an integer >= 1, or adapt "
                               f"with minimum and maximum")


def _scaling_text(spec: ClusterSpec) -> str:
    backend = _BACKENDS[spec.backend]
    adapt, workers = spec.data.get("adapt"), spec.data.get("workers")
    if adapt is not None:
        return (f"adaptive, {adapt['minimum']} to {adapt['maximum']} workers "
                f"(idle workers are retired gracefully)")
    if backend.scaling is None:
        return backend.fixed_text(spec)
    return f"fixed, {workers} worker(s)" if workers is not None else backend.fixed_text(spec)


def _seconds(seconds: float) -> str:
    return f"{seconds:g} s"


# --- TLS -------------------------------------------------------------------


def _tls_files(spec: ClusterSpec, check: bool = True) -> dict:
    """The TLS files a spec names, expanded and (when ``check``) checked to exist."""
    files = {}
    for key, value in spec.data["tls"].items():
        if value is None:
            continue
        path = os.path.expandvars(os.path.expanduser(value))
        if check and not os.path.isfile(path):
            raise ClusterSpecError(f"{_display(spec.path)}: tls.{key}: no such file {value!r}")
        files[key] = path
    return files


def _security(spec: ClusterSpec, roles=("client", "scheduler", "worker"), check: bool = True):
    """A Security from the spec's TLS files, or its ``tls`` value (True, False, None)."""
    tls = spec.data.get("tls")
    if not isinstance(tls, dict):
        return tls
    from distributed import Security

    files = _tls_files(spec, check)
    options = {"tls_ca_file": files["ca_file"]}
    for role in roles:
        options[f"tls_{role}_cert"] = files["cert"]
        options[f"tls_{role}_key"] = files.get("key", files["cert"])  # one PEM may hold both
    return Security(require_encryption=True, **options)


def _tls_text(spec: ClusterSpec) -> str:
    tls = spec.data.get("tls")
    if isinstance(tls, dict):
        return "TLS with " + ", ".join(f"{k}={v}" for k, v in tls.items() if v is not None)
    if tls is None:
        tls = dask.config.get("daskdist.cluster.tls")
    return "TLS with temporary certificates (Security.temporary())" if tls else "none (TCP)"


# --- back ends -------------------------------------------------------------


class _Backend:
    """How one kind of cluster is validated, described and started."""

    name = ""
    section: str | None = None  # the key of the back end's own options
    options: dict = {}  # the schema of each of those options
    required: tuple = ()  # options the section must give
    # workers and adapt: "optional", "required", "fixed-only" (no adapt) or None (neither key)
    scaling: str | None = "optional"
    tls: str | None = "any"  # "any": true, false or files; "files": files only; None: no TLS
    package: tuple | None = None  # (module, pip package, daskdist extra) imported when used

    def schema(self) -> dict:
        properties = {"backend": {"enum": sorted(_BACKENDS)}, "timeout": _nullable(_DURATION)}
        if self.scaling is not None:
            properties["workers"] = _nullable(_COUNT)
            if self.scaling != "fixed-only":
                properties["adapt"] = _ADAPT
        if self.tls == "any":
            properties["tls"] = {**_TLS_FILES, "type": ["boolean", "object", "null"],
                                 "description": "true, false, or a mapping with ca_file, cert "
                                                "and key"}
        elif self.tls == "files":
            properties["tls"] = {**_TLS_FILES, "type": ["object", "null"]}
        if self.section is not None:
            properties[self.section] = _sections(self.options, self.required)
        properties.update(self.extra_properties())
        required = ["backend", *([self.section] if self.required else [])]
        return {"type": "object", "properties": properties, "required": required,
                "additionalProperties": False}

    def extra_properties(self) -> dict:
        return {}

    def option_values(self, spec: ClusterSpec) -> dict:
        """The section's options that are set (not null)."""
        section = spec.data.get(self.section) or {}
        return {key: value for key, value in section.items() if value is not None}

    def check_installed(self, spec: ClusterSpec) -> None:
        if self.package is not None:
            _require(spec, self, *self.package)

    def start(self, spec: ClusterSpec):
        raise NotImplementedError

    def client(self, spec: ClusterSpec, cluster, timeout: float) -> Client:
        return Client(cluster, set_as_default=False)

    def expected_workers(self, spec: ClusterSpec, cluster) -> int | None:
        adapt = spec.data.get("adapt")
        if adapt is not None:
            return adapt["minimum"]
        workers = spec.data.get("workers")
        if workers is None and cluster is not None:
            return len(cluster.worker_spec)
        return workers

    def describe(self, spec: ClusterSpec) -> str:
        raise NotImplementedError

    def fixed_text(self, spec: ClusterSpec) -> str:
        return "fixed"

    def hint(self, spec: ClusterSpec) -> str:
        return ""


def _require(spec: ClusterSpec, backend: _Backend, module: str, package: str, extra: str):
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise ImportError(f"{_display(spec.path)}: backend: {backend.name!r} needs the {package} "
                          f"package: pip install 'daskdist[{extra}]'") from error


def _yaml(mapping: dict) -> str:
    # A JSON round trip drops shared references, which YAML would print as anchors.
    return yaml.safe_dump(json.loads(json.dumps(mapping)), sort_keys=False,
                          default_flow_style=False)


def _indent(text: str, prefix: str = "  ") -> str:
    return "".join(prefix + line for line in text.splitlines(keepends=True))


def _initial_workers(spec: ClusterSpec) -> int | None:
    """The workers to start with: ``adapt.minimum``, else ``workers``."""
    adapt = spec.data.get("adapt")
    return adapt["minimum"] if adapt is not None else spec.data.get("workers")


def _adapt(spec: ClusterSpec, cluster) -> None:
    """Turn on adaptive scaling when the spec asks for it."""
    adapt = spec.data.get("adapt")
    if adapt is not None:
        cluster.adapt(minimum=adapt["minimum"], maximum=adapt["maximum"])


class _Local(_Backend):
    name = "local"
    section = "local"
    options = {
        "threads_per_worker": _COUNT,
        "memory_limit": _MEMORY_LIMIT,
        "host": _STRING,
        "dashboard_address": _STRING,
    }

    def option_values(self, spec):
        options = super().option_values(spec)
        if "host" in options:  # the dashboard listens beside the scheduler
            options.setdefault("dashboard_address", f"{options['host']}:0")
        return options

    def start(self, spec):
        from daskdist.clients import embedded_cluster

        cluster = embedded_cluster(_initial_workers(spec), security=_security(spec),
                                   **self.option_values(spec))
        _adapt(spec, cluster)
        return cluster

    def resolved_options(self, spec) -> dict:
        """The options :func:`~daskdist.clients.embedded_cluster` will use."""
        host = dask.config.get("daskdist.cluster.host")
        n_workers = (_initial_workers(spec) or dask.config.get("daskdist.cluster.n-workers")
                     or os.cpu_count() or 1)
        return {
            "n_workers": n_workers,
            "threads_per_worker": dask.config.get("daskdist.cluster.threads-per-worker"),
            "processes": True,
            "host": host,
            "dashboard_address": f"{host}:0",
            **self.option_values(spec),
        }

    def expected_workers(self, spec, cluster):
        if cluster is None and spec.data.get("adapt") is None:
            return self.resolved_options(spec)["n_workers"]
        return super().expected_workers(spec, cluster)

    def describe(self, spec):
        from daskdist.clients import embedded_cluster_config

        return ("# distributed.LocalCluster in this process "
                "(daskdist.clients.embedded_cluster)\n"
                + _yaml({**self.resolved_options(spec), "security": _tls_text(spec)})
                + "# Dask settings while the workers start (daskdist.cluster.dask-config):\n"
                + _indent(_yaml(embedded_cluster_config()), "#   "))

    def fixed_text(self, spec):
        return (f"fixed, {self.resolved_options(spec)['n_workers']} worker(s) "
                f"(workers: null, so daskdist.cluster.n-workers, else one per core)")


class _LocalCUDA(_Backend):
    name = "local-cuda"
    section = "cuda"
    options = {
        "devices": {"type": ["string", "array"], "items": {"type": ["integer", "string"]},
                    "description": "GPUs such as '0,1' or [0, 1]"},
        "threads_per_worker": _COUNT,
        "memory_limit": _MEMORY_LIMIT,
        "device_memory_limit": {"type": ["string", "number"],
                                "description": "a size such as '30GB' or a fraction such as 0.8"},
        "rmm_pool_size": {"type": ["string", "number"],
                          "description": "a size such as '24GB' or a fraction such as 0.9"},
        "protocol": {"type": "string", "enum": ["tcp", "ucx"], "description": "'tcp' or 'ucx'"},
        "local_directory": _STRING,
        "dashboard_address": _STRING,
    }
    scaling = "fixed-only"
    package = ("dask_cuda", "dask-cuda", "cuda")

    def cluster_options(self, spec) -> dict:
        options = self.option_values(spec)
        host = dask.config.get("daskdist.cluster.host")
        if "devices" in options:
            devices = options.pop("devices")
            options["CUDA_VISIBLE_DEVICES"] = (devices if isinstance(devices, str)
                                               else ",".join(map(str, devices)))
        return {
            "n_workers": spec.data.get("workers"),
            "threads_per_worker": dask.config.get("daskdist.cluster.threads-per-worker"),
            "host": host,
            "dashboard_address": f"{host}:0",
            **options,
        }

    def start(self, spec):
        from daskdist.clients import _temporary_security, embedded_cluster_config

        dask_cuda = _require(spec, self, *self.package)
        security = _security(spec)
        if security is None:
            security = bool(dask.config.get("daskdist.cluster.tls"))
        if security is True:
            security = _temporary_security()
        with dask.config.set(embedded_cluster_config()):
            return dask_cuda.LocalCUDACluster(security=security or None,
                                              **self.cluster_options(spec))

    def describe(self, spec):
        return ("# dask_cuda.LocalCUDACluster in this process, one worker per GPU\n"
                + _yaml({**self.cluster_options(spec), "security": _tls_text(spec)}))

    def fixed_text(self, spec):
        return "one worker per visible GPU"


class _SSH(_Backend):
    name = "ssh"
    section = "ssh"
    options = {
        "hosts": {"type": "array", "items": _STRING, "minItems": 2,
                  "description": "a list of at least two host names (the scheduler's first)"},
        "connect_options": _MAPPING,
        "worker_options": _MAPPING,
        "scheduler_options": _MAPPING,
        "worker_class": _STRING,
        "remote_python": _STRING,
    }
    required = ("hosts",)
    scaling = None
    tls = None
    package = ("asyncssh", "asyncssh", "ssh")

    def start(self, spec):
        from distributed.deploy.ssh import SSHCluster

        from daskdist.clients import embedded_cluster_config

        # SSHCluster hands this process's Dask settings to the remote processes.
        with dask.config.set(embedded_cluster_config()):
            return SSHCluster(**self.option_values(spec))

    def per_host(self, spec) -> int:
        return (spec.data["ssh"].get("worker_options") or {}).get("n_workers", 1)

    def expected_workers(self, spec, cluster):
        return (len(spec.data["ssh"]["hosts"]) - 1) * self.per_host(spec)

    def describe(self, spec):
        options = self.option_values(spec)
        python = options.get("remote_python", sys.executable)
        scheduler_spec = {"cls": "distributed.Scheduler",
                          "opts": options.get("scheduler_options", {})}
        worker_options = dict(options.get("worker_options", {}))
        n_workers = worker_options.pop("n_workers", 1)
        worker_spec = {i: {"cls": options.get("worker_class", "distributed.Nanny"),
                           "opts": worker_options} for i in range(n_workers)}
        hosts = options["hosts"]
        lines = ["# distributed.deploy.ssh.SSHCluster: over SSH "
                 f"(connect_options: {json.dumps(options.get('connect_options', {}))})",
                 f"# scheduler on {hosts[0]}:",
                 f"{python} -m distributed.cli.dask_spec --spec '{json.dumps(scheduler_spec)}'"]
        for host in hosts[1:]:
            lines += [f"# {n_workers} worker(s) on {host}:",
                      f"{python} -m distributed.cli.dask_spec {SCHEDULER_PLACEHOLDER} "
                      f"--spec '{json.dumps(worker_spec)}'"]
        return "\n".join(lines)

    def fixed_text(self, spec):
        hosts = len(spec.data["ssh"]["hosts"]) - 1
        return f"fixed, {self.per_host(spec)} worker(s) on each of {hosts} host(s)"

    def hint(self, spec):
        return " (check that the worker hosts reach the scheduler's host)"


class _JobQueue(_Backend):
    """SLURM and PBS through dask-jobqueue: a local scheduler, workers in batch jobs."""

    section = "jobqueue"
    options = {
        "cores": _COUNT,
        "memory": _SIZE,
        "processes": _COUNT,
        "queue": _STRING,
        "account": _STRING,
        "walltime": {**_STRING, "description": "a string such as '01:00:00'"},
        "job_name": _STRING,
        "job_extra_directives": _STRINGS,
        "job_directives_skip": _STRINGS,
        "job_script_prologue": _STRINGS,
        "worker_extra_args": _STRINGS,
        "interface": _STRING,
        "local_directory": _STRING,
        "log_directory": _STRING,
        "shared_temp_directory": _STRING,
        "python": _STRING,
        "shebang": _STRING,
        "death_timeout": {"type": "number", "description": "a number of seconds"},
        "nanny": _BOOL,
        "scheduler_options": _MAPPING,
    }
    required = ("cores", "memory")
    scaling = "required"
    package = ("dask_jobqueue", "dask-jobqueue", "jobqueue")
    cluster_class = ""  # in dask_jobqueue
    job_class = ""  # module.name
    queue_command = ""

    def start(self, spec):
        dask_jobqueue = _require(spec, self, *self.package)
        cluster_cls = getattr(dask_jobqueue, self.cluster_class)
        cluster = cluster_cls(n_workers=_initial_workers(spec), security=_security(spec) or None,
                              **self.option_values(spec))
        _adapt(spec, cluster)
        return cluster

    def describe(self, spec):
        _require(spec, self, *self.package)
        module, _, name = self.job_class.rpartition(".")
        job_cls = getattr(importlib.import_module(module), name)
        options = self.option_values(spec)
        cluster_only = {key: options.pop(key, None) for key in ("scheduler_options",
                                                                "shared_temp_directory")}
        cluster_only = {key: value for key, value in cluster_only.items() if value}
        tls = spec.data.get("tls")
        protocol = "tls" if tls else "tcp"
        if isinstance(tls, dict):
            options["security"] = _security(spec, check=False)
        if tls:
            options["protocol"] = "tls://"
        script = job_cls(f"{protocol}://{SCHEDULER_PLACEHOLDER}:8786", name="{worker-name}",
                         **options).job_script()
        lines = [f"# dask_jobqueue.{self.cluster_class}: the scheduler runs in this process, "
                 f"each worker batch job runs this script (submitted with "
                 f"{job_cls.submit_command}):"]
        if tls is True:
            lines.append("# (temporary TLS certificates are added to the worker command "
                         "when the cluster starts)")
        if cluster_only:
            lines.append(_indent(_yaml(cluster_only), "# ").rstrip())
        return "\n".join(lines) + "\n" + script

    def hint(self, spec):
        return f" (are the jobs still queued? see {self.queue_command})"


class _Slurm(_JobQueue):
    name = "slurm"
    options = {**_JobQueue.options,
               "job_cpu": _COUNT,
               "job_mem": {**_STRING, "description": "a size in Slurm's units such as '16G'"}}
    cluster_class = "SLURMCluster"
    job_class = "dask_jobqueue.slurm.SLURMJob"
    queue_command = "squeue --me"


class _PBS(_JobQueue):
    name = "pbs"
    options = {**_JobQueue.options,
               "resource_spec": {**_STRING, "description": "a string such as "
                                                           "'select=1:ncpus=4:mem=16GB'"}}
    cluster_class = "PBSCluster"
    job_class = "dask_jobqueue.pbs.PBSJob"
    queue_command = "qstat -u $USER"


class _Kubernetes(_Backend):
    name = "kubernetes"
    section = "kubernetes"
    options = {
        "name": _STRING,
        "namespace": _STRING,
        "image": _STRING,
        "resources": {"type": "object", "description": "a mapping with requests and limits",
                      "properties": {"requests": _MAPPING, "limits": _MAPPING},
                      "additionalProperties": False},
        "env": {"type": "object", "additionalProperties": _STRING,
                "description": "a mapping of variable names to strings"},
        "worker_command": {"type": ["string", "array"], "items": _STRING,
                           "description": "a command as a string or a list of strings"},
        "scheduler_service_type": {"type": "string",
                                   "enum": ["ClusterIP", "NodePort", "LoadBalancer"],
                                   "description": "'ClusterIP', 'NodePort' or 'LoadBalancer'"},
        "idle_timeout": {"type": "integer", "minimum": 0,
                         "description": "a number of seconds (0: never)"},
        "resource_timeout": _COUNT,
        "port_forward_cluster_ip": _BOOL,
        "shutdown_on_close": _BOOL,
    }
    required = ("image",)
    scaling = "required"
    tls = None
    package = ("dask_kubernetes.operator", "dask-kubernetes", "kubernetes")

    def cluster_name(self, spec) -> str:
        return self.option_values(spec).get("name", "daskdist")

    def start(self, spec):
        operator = _require(spec, self, *self.package)
        options = {"name": self.cluster_name(spec), **self.option_values(spec)}
        cluster = operator.KubeCluster(n_workers=_initial_workers(spec), **options)
        _adapt(spec, cluster)
        return cluster

    def describe(self, spec):
        operator = _require(spec, self, *self.package)
        options = self.option_values(spec)
        name = self.cluster_name(spec)
        keys = ("image", "resources", "env", "worker_command", "scheduler_service_type",
                "idle_timeout")
        resource = operator.make_cluster_spec(
            name, n_workers=_initial_workers(spec), **{k: options[k] for k in keys
                                                       if k in options})
        if "namespace" in options:
            resource["metadata"]["namespace"] = options["namespace"]
        documents = [resource]
        adapt = spec.data.get("adapt")
        if adapt is not None:
            documents.append({"apiVersion": "kubernetes.dask.org/v1", "kind": "DaskAutoscaler",
                              "metadata": {"name": name},
                              "spec": {"cluster": name, "minimum": adapt["minimum"],
                                       "maximum": adapt["maximum"]}})
        return ("# resources created through the Dask Kubernetes operator "
                "(dask_kubernetes.operator.KubeCluster):\n"
                + "---\n".join(_yaml(document) for document in documents))

    def hint(self, spec):
        return (f" (see kubectl get pods -l dask.org/cluster-name={self.cluster_name(spec)}; "
                f"is the Dask operator installed?)")


class _Address(_Backend):
    name = "address"
    scaling = None
    tls = "files"

    def extra_properties(self):
        return {"address": {**_STRING, "description": "a scheduler address such as "
                                                      "'tcp://scheduler:8786'"},
                "wait_for_workers": {"type": ["integer", "null"], "minimum": 0,
                                     "description": "an integer >= 0 or null"}}

    def schema(self):
        schema = super().schema()
        schema["required"].append("address")
        return schema

    def start(self, spec):
        return None

    def client(self, spec, cluster, timeout):
        security = _security(spec, roles=("client",))
        try:
            return Client(spec.data["address"], security=security, timeout=timeout,
                          set_as_default=False)
        except OSError as error:
            raise OSError(f"{_display(spec.path)}: cannot reach the scheduler at "
                          f"{spec.data['address']}: {error}") from error

    def expected_workers(self, spec, cluster):
        return spec.data.get("wait_for_workers")

    def describe(self, spec):
        return f"# connects to the running scheduler at\n{spec.data['address']}\n" + (
            f"# security: {_tls_text(spec)}" if spec.data.get("tls") else "")

    def fixed_text(self, spec):
        return "none: the workers are the running scheduler's"

    def hint(self, spec):
        return " (are workers connected to this scheduler?)"


_BACKENDS: dict[str, _Backend] = {
    backend.name: backend
    for backend in (_Local(), _LocalCUDA(), _SSH(), _Slurm(), _PBS(), _Kubernetes(), _Address())
}
