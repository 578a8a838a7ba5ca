"""JSON-schema errors as one-line messages: the field, then the problem.

Pipeline files (:mod:`daskdist.batch.load`) and cluster specs
(:mod:`daskdist.clusters`) are YAML checked against a JSON schema; both
report the first problem as ``FILE: FIELD: PROBLEM``, e.g. ``train.lr:
expected a number, got 'fast'``. This module finds that problem
(:func:`best_error`) and words it (:func:`describe`).

The wording comes from the schema. What a value should be is, in order:

- the schema's ``expected`` keyword, a phrase that completes "expected …"
  (``expected: "a size such as '16GB'"``); validation ignores the keyword;
- else ``enum`` (``one of: tcp, ucx``), ``type`` (``an integer``, ``a list of
  strings``, ``true or false``), the bound that failed (``an integer >= 1``),
  or the branches of ``oneOf`` / ``anyOf`` joined with "or".

A required field's ``description`` is quoted when it is missing.
"""

from __future__ import annotations

import difflib
import functools

__all__ = ["best_error", "describe", "did_you_mean", "dotted", "expected", "show"]

#: How each JSON type is named to someone writing YAML: (one, several).
_TYPES = {
    "string": ("a string", "strings"),
    "integer": ("an integer", "integers"),
    "number": ("a number", "numbers"),
    "boolean": ("true or false", "booleans"),
    "object": ("a mapping", "mappings"),
    "array": ("a list", "lists"),
    "null": ("null", "nulls"),
}
#: The bound keywords, as the comparison a valid value passes.
_BOUNDS = {"minimum": ">=", "maximum": "<=", "exclusiveMinimum": ">", "exclusiveMaximum": "<"}
_ITEMS = {"minItems": "at least", "maxItems": "at most"}


@functools.cache
def _validator_class():
    import jsonschema

    # YAML's 4.0 is not a count: "integer" means int only (and never bool).
    def is_integer(checker, value):
        return isinstance(value, int) and not isinstance(value, bool)

    draft = jsonschema.Draft202012Validator
    return jsonschema.validators.extend(
        draft, type_checker=draft.TYPE_CHECKER.redefine("integer", is_integer))


def best_error(schema: dict, instance, format_checker=None):
    """The one error to report when ``instance`` does not match ``schema``.

    Validates with JSON Schema draft 2020-12, except that ``integer`` accepts
    only Python ints (not ``4.0``, not booleans), and picks the error with
    :func:`jsonschema.exceptions.best_match`: the shallowest field first, and
    inside ``oneOf`` / ``anyOf`` the branch that got furthest.

    Parameters
    ----------
    schema : dict
        The JSON schema.
    instance : object
        The data read from YAML.
    format_checker : jsonschema.FormatChecker, optional
        Checks the ``format`` keyword; None leaves formats unchecked.

    Returns
    -------
    jsonschema.exceptions.ValidationError or None
        None when ``instance`` is valid.
    """
    import jsonschema

    validator = _validator_class()(schema, format_checker=format_checker)
    return jsonschema.exceptions.best_match(validator.iter_errors(instance))


def describe(error, *, scope: str | None = None) -> tuple[str, str]:
    """Word a validation error as a field and a problem.

    Parameters
    ----------
    error : jsonschema.exceptions.ValidationError
        Usually from :func:`best_error`.
    scope : str, optional
        What the document is, named when a top-level key is unknown
        (``"backend 'local'"`` gives "unknown key for backend 'local'").

    Returns
    -------
    field : str
        The dotted path of the field (``jobqueue.cores``, ``ssh.hosts[1]``);
        an unknown or missing key's own path; ``-`` for the whole document.
    problem : str
        What is wrong and what was expected, e.g. ``expected an integer >= 1,
        got 'four'``, ``unknown key (did you mean 'cores'?); expected one of:
        account, cores``, ``missing required field; expected a mapping``.
    """
    path = list(error.absolute_path)
    kind, schema, value = error.validator, error.schema, error.instance
    if kind == "additionalProperties":
        known = sorted(schema.get("properties", {}))
        unknown = sorted(str(key) for key in value if key not in known)[0]
        where = f" for {scope}" if scope and not path else ""
        listing = f"; expected one of: {', '.join(known)}" if known else ""
        return dotted([*path, unknown]), (f"unknown key{where}{did_you_mean(unknown, known)}"
                                          f"{listing}")
    if kind == "required":
        missing = next(key for key in error.validator_value if key not in value)
        field_schema = schema.get("properties", {}).get(missing, {})
        about = field_schema.get("description")
        wanted = expected(field_schema)
        return dotted([*path, missing]), ("missing required field"
                                          + (f" ({' '.join(about.split())})" if about else "")
                                          + (f"; expected {wanted}" if wanted else ""))
    field = dotted(path) or "-"
    if kind in _BOUNDS:
        wanted = schema.get("expected") or (f"{_types(schema, single=True)} {_BOUNDS[kind]} "
                                            f"{error.validator_value}")
    elif kind in _ITEMS:
        wanted = schema.get("expected") or (f"{_types(schema, single=True)} with "
                                            f"{_ITEMS[kind]} {error.validator_value} item(s)")
    elif kind == "format":
        wanted = schema.get("expected") or f"a valid {error.validator_value}"
    elif kind in ("type", "enum", "const", "oneOf", "anyOf"):
        wanted = expected(schema)
    else:
        wanted = ""
    if not wanted:  # nothing in the schema to word it with: jsonschema's own message
        return field, " ".join(str(error.message).split())
    hint = ""
    if kind == "enum" and isinstance(value, str):
        hint = did_you_mean(value, map(str, error.validator_value))
    separator = "; " if wanted.startswith("one of:") else ", "  # a list ends with "; got"
    return field, f"expected {wanted}{separator}got {show(value)}{hint}"


def expected(schema: dict) -> str:
    """The phrase that completes "expected …" for a value of ``schema``.

    Parameters
    ----------
    schema : dict
        The schema of one field.

    Returns
    -------
    str
        The ``expected`` keyword, else a phrase built from ``enum``,
        ``const``, ``type`` or the ``oneOf`` / ``anyOf`` branches (``one of:
        tcp, ucx``, ``an integer or null``, ``a string or a list of
        strings``); empty when the schema says nothing about the value.
    """
    if "expected" in schema:
        return schema["expected"]
    if "enum" in schema:
        return "one of: " + ", ".join(_option(value) for value in schema["enum"])
    if "const" in schema:
        return show(schema["const"])
    if "type" in schema:
        return _types(schema)
    branches = schema.get("oneOf") or schema.get("anyOf") or ()
    return " or ".join(filter(None, map(expected, branches)))


def _types(schema: dict, single: bool = False) -> str:
    """``type`` in words; ``single``: without null (for a bound's phrase)."""
    types = schema.get("type", [])
    types = [types] if isinstance(types, str) else types
    if single:
        types = [name for name in types if name != "null"]
    words = []
    for name in types:
        one = _TYPES.get(name, (f"a {name}",))[0]
        items = schema.get("items")
        if name == "array" and isinstance(items, dict) and "type" in items:
            item_types = [items["type"]] if isinstance(items["type"], str) else items["type"]
            one += " of " + " or ".join(_TYPES.get(t, ("", f"{t}s"))[1] for t in item_types)
        words.append(one)
    return " or ".join(words) or "a value"


def dotted(path) -> str:
    """A path of keys and list indices as text: ``ssh.hosts[1]``.

    Parameters
    ----------
    path : iterable of str or int
        Keys of mappings (str) and indices of lists (int), outermost first.

    Returns
    -------
    str
        Keys joined with dots, indices in brackets; empty for an empty path.
    """
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else f".{part}" if text else str(part)
    return text


def did_you_mean(word: str, options) -> str:
    """A hint naming the option closest to a misspelt ``word``, if one is close.

    Parameters
    ----------
    word : str
        What was written.
    options : iterable of str
        What could have been meant.

    Returns
    -------
    str
        ``" (did you mean 'cores'?)"``, or ``""`` when no option is close
        (:func:`difflib.get_close_matches`).
    """
    close = difflib.get_close_matches(word, list(options), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def show(value) -> str:
    """A value as it is written in YAML: ``null``, ``true``, ``'four'``, ``2.0``.

    Parameters
    ----------
    value : object
        A value read from YAML.

    Returns
    -------
    str
        ``null`` and ``true`` / ``false`` as YAML spells them; anything else
        as its ``repr``, so that strings are quoted.
    """
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return repr(value)


def _option(value) -> str:
    """One of an ``enum``'s values in a list: strings unquoted."""
    return value if isinstance(value, str) else show(value)
