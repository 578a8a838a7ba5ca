"""A spec's ``tls``: throw-away certificates (``true``) or the files it names."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import dask.config

from .errors import ClusterSpecError, display

if TYPE_CHECKING:
    from .spec import ClusterSpec


def tls_files(spec: ClusterSpec, check: bool = True) -> dict:
    """The TLS files a spec names, expanded and (when ``check``) checked to exist."""
    files = {}
    for key, value in spec.data["tls"].items():
        if value is None:
            continue
        path = os.path.expandvars(os.path.expanduser(value))
        if check and not os.path.isfile(path):
            raise ClusterSpecError(f"{display(spec.path)}: tls.{key}: no such file {value!r}")
        files[key] = path
    return files


def security(spec: ClusterSpec, roles=("client", "scheduler", "worker"), check: bool = True):
    """A Security from the spec's TLS files, or its ``tls`` value (True, False, None)."""
    tls = spec.data.get("tls")
    if not isinstance(tls, dict):
        return tls
    from distributed import Security

    files = tls_files(spec, check)
    options = {"tls_ca_file": files["ca_file"]}
    for role in roles:
        options[f"tls_{role}_cert"] = files["cert"]
        options[f"tls_{role}_key"] = files.get("key", files["cert"])  # one PEM may hold both
    return Security(require_encryption=True, **options)


def tls_text(spec: ClusterSpec) -> str:
    """The spec's TLS in words, for dry runs."""
    tls = spec.data.get("tls")
    if isinstance(tls, dict):
        return "TLS with " + ", ".join(f"{k}={v}" for k, v in tls.items() if v is not None)
    if tls is None:
        tls = dask.config.get("daskdist.cluster.tls")
    return "TLS with temporary certificates (Security.temporary())" if tls else "none (TCP)"
