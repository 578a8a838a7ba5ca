"""The pieces the back ends' JSON schemas are built from.

Each piece says what its value should be in an ``expected`` phrase, which
:mod:`daskdist.schema_errors` puts in messages ("expected a size such as
'16GB', got 'lots'"). Sizes and durations are checked by :data:`FORMATS`.
"""

from __future__ import annotations

import jsonschema
from dask.utils import parse_bytes, parse_timedelta

STRING = {"type": "string", "expected": "a string"}
STRINGS = {"type": "array", "items": STRING, "expected": "a list of strings"}
MAPPING = {"type": "object", "expected": "a mapping"}
BOOL = {"type": "boolean", "expected": "true or false"}
COUNT = {"type": "integer", "minimum": 1, "expected": "an integer >= 1"}
SIZE = {"type": "string", "format": "size", "expected": "a size such as '16GB'"}
MEMORY_LIMIT = {"type": ["string", "number"],
                "expected": "a size such as '4GB', a fraction of the memory, or 'auto'"}
DURATION = {"type": ["string", "number"], "format": "duration",
            "expected": "a duration such as 90, '90s' or '10 minutes'"}
TLS_FILES = {
    "type": "object",
    "expected": "a mapping with ca_file, cert and key",
    "properties": {
        "ca_file": {**STRING, "expected": "the path of the CA certificate (PEM)"},
        "cert": {**STRING, "expected": "the path of the certificate (PEM)"},
        "key": {"type": ["string", "null"],
                "expected": "the path of the private key (PEM), or null when cert holds it"},
    },
    "required": ["ca_file", "cert"],
    "additionalProperties": False,
}
ADAPT = {
    "type": ["object", "null"],
    "expected": "a mapping with minimum and maximum, or null",
    "properties": {"minimum": COUNT, "maximum": COUNT},
    "required": ["minimum", "maximum"],
    "additionalProperties": False,
}


def nullable(schema: dict) -> dict:
    """``schema`` that also accepts null."""
    types = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
    nullable = {**schema, "type": [*types, "null"], "expected": schema["expected"] + " or null"}
    if "enum" in schema:
        nullable["enum"] = [*schema["enum"], None]
    return nullable


def section(options: dict, required=()) -> dict:
    """The schema of a back end's section; options not required may be null."""
    properties = {key: value if key in required else nullable(value)
                  for key, value in options.items()}
    return {"type": "object", "expected": "a mapping", "properties": properties,
            "required": list(required), "additionalProperties": False}


#: Checks the ``size`` and ``duration`` formats (Dask's parsers) and no others.
FORMATS = jsonschema.FormatChecker(formats=())


@FORMATS.checks("size", raises=(ValueError, KeyError))
def _is_size(value) -> bool:
    return not isinstance(value, str) or parse_bytes(value) >= 0


@FORMATS.checks("duration", raises=(ValueError, KeyError))
def _is_duration(value) -> bool:
    return not isinstance(value, str) or parse_timedelta(value) >= 0
