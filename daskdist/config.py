"""daskdist's settings, under the ``daskdist`` key of Dask's configuration.

Defaults live in ``daskdist.yaml`` beside this module and are documented in
``daskdist-schema.yaml``. Users change them like any Dask setting: in
``~/.config/dask/daskdist.yaml``, with ``DASK_DASKDIST__DRIVER__LOOKAHEAD=4``,
or with ``dask.config.set({"daskdist.driver.lookahead": 4})``.
"""

from __future__ import annotations

import os

import dask.config
import yaml

__all__ = ["DEFAULTS_PATH", "SCHEMA_PATH", "defaults"]

DEFAULTS_PATH = os.path.join(os.path.dirname(__file__), "daskdist.yaml")
SCHEMA_PATH = os.path.join(os.path.dirname(__file__), "daskdist-schema.yaml")


def defaults() -> dict:
    """The packaged defaults, as a nested dict."""
    with open(DEFAULTS_PATH) as f:
        return yaml.safe_load(f)


dask.config.update_defaults(defaults())
