"""What every back end is: the base class, and the helpers its dry runs share."""

from __future__ import annotations

import importlib
import json
from typing import TYPE_CHECKING

import yaml
from distributed import Client

from ..errors import display
from ..schema import ADAPT, COUNT, DURATION, TLS_FILES, nullable, section

if TYPE_CHECKING:
    from ..spec import ClusterSpec

#: Placeholder for the scheduler address in rendered job scripts and commands.
SCHEDULER_PLACEHOLDER = "{scheduler}"


class Backend:
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
        """The JSON schema of a spec for this back end."""
        properties = {"backend": {"const": self.name}, "timeout": nullable(DURATION)}
        if self.scaling is not None:
            properties["workers"] = nullable(COUNT)
            if self.scaling != "fixed-only":
                properties["adapt"] = ADAPT
        if self.tls == "any":
            properties["tls"] = {**TLS_FILES, "type": ["boolean", "object", "null"],
                                 "expected": "true, false, or a mapping with ca_file, cert "
                                             "and key"}
        elif self.tls == "files":
            properties["tls"] = {**TLS_FILES, "type": ["object", "null"]}
        if self.section is not None:
            properties[self.section] = section(self.options, self.required)
        properties.update(self.extra_properties())
        required = ["backend", *([self.section] if self.required else [])]
        return {"type": "object", "properties": properties, "required": required,
                "additionalProperties": False}

    def extra_properties(self) -> dict:
        return {}

    def option_values(self, spec: ClusterSpec) -> dict:
        """The section's options that are set (not null)."""
        options = spec.data.get(self.section) or {}
        return {key: value for key, value in options.items() if value is not None}

    def check_installed(self, spec: ClusterSpec) -> None:
        if self.package is not None:
            require(spec, self, *self.package)

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

    def hint(self, spec: ClusterSpec, cluster=None) -> str:
        """What to check when the workers did not arrive in time (text after the count)."""
        return ""


def require(spec: ClusterSpec, backend: Backend, module: str, package: str, extra: str):
    """Import a back end's optional package, or say which extra installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise ImportError(f"{display(spec.path)}: backend: {backend.name!r} needs the {package} "
                          f"package: pip install 'daskdist[{extra}]'") from error


def yaml_text(mapping: dict) -> str:
    """A mapping as YAML, in its own order."""
    # A JSON round trip drops shared references, which YAML would print as anchors.
    return yaml.safe_dump(json.loads(json.dumps(mapping)), sort_keys=False,
                          default_flow_style=False)


def indent(text: str, prefix: str = "  ") -> str:
    """``text`` with ``prefix`` before each line."""
    return "".join(prefix + line for line in text.splitlines(keepends=True))
