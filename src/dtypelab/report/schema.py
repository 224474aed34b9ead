"""JSON Schemas of the results' ``--json`` documents, derived from the result dataclasses.

Report layer: the schema of a kind (:data:`~dtypelab.report.table.JSON_KINDS`) is read off its
dataclass's type hints — ``int`` an integer, ``float`` a number (or ``null`` with a ``<field>_status``
sibling, :data:`~dtypelab.report.table.NON_FINITE`), ``str`` and string enums strings, lists arrays,
nested dataclasses ``$defs`` — the same walk :func:`~dtypelab.report.table.to_jsonable` makes, so the
schema cannot describe fields the JSON does not have. The schemas ship as package data
(``report/schemas/<kind>.json``, :func:`load_schema`); a test regenerates them and fails when a
shipped one differs, so a changed result changes its schema in the same commit.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import types
import typing
from collections import abc
from importlib import resources
from typing import Any

from .table import COMPOSITE_KINDS, JSON_KINDS, schema_id

STATUS = {"enum": ["inf", "-inf", "nan"]}
"""What a ``<field>_status`` sibling may say."""


def json_schema(kind: str, classes: dict[str, type]) -> dict:
    """The JSON Schema (draft 2020-12) of a registered kind's document.

    Args:
        kind: a kind of :data:`JSON_KINDS` or :data:`COMPOSITE_KINDS`.
        classes: result class name -> the class (the report layer cannot import the stages above it).
    """
    defs: dict[str, dict] = {}
    if kind in COMPOSITE_KINDS:
        version, parts = COMPOSITE_KINDS[kind]
        body = {"type": "object", "properties": {key: _object(classes[name], defs) for key, name in
                                                 parts.items()}, "required": sorted(parts)}
    else:
        name = next(n for n, (k, _) in JSON_KINDS.items() if k == kind)
        version, body = JSON_KINDS[name][1], _object(classes[name], defs)
    head = {"schema": {"const": schema_id(kind, version)}, "dtypelab_version": {"type": "string"}}
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", "$id": schema_id(kind, version),
            "title": f"dtypelab {kind} document, version {version}", "type": "object",
            "properties": {**head, **body["properties"]},
            "required": ["schema", "dtypelab_version", *body["required"]],
            **({"$defs": dict(sorted(defs.items()))} if defs else {})}


def load_schema(kind: str) -> dict:
    """The shipped schema of ``kind`` (package data ``dtypelab/report/schemas/<kind>.json``)."""
    text = resources.files(__package__).joinpath("schemas", f"{kind}.json").read_text(encoding="utf-8")
    return json.loads(text)


def _object(cls: type, defs: dict[str, dict]) -> dict:
    """The properties of a dataclass's JSON object: every field ``to_jsonable`` writes, all required,
    and an optional ``<field>_status`` beside every number."""
    hints = typing.get_type_hints(cls)
    properties: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.name.startswith("_") or not f.repr:
            continue
        properties[f.name] = _type(hints[f.name], defs)
        status = _status_of(hints[f.name])
        if status is not None:
            properties[f"{f.name}_status"] = status
    required = [f.name for f in dataclasses.fields(cls) if f.name in properties]
    return {"type": "object", "properties": properties, "required": required}


def _type(hint: Any, defs: dict[str, dict]) -> dict:
    """The schema of one type hint, as :func:`to_jsonable` writes a value of it."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return {"anyOf": [_type(a, defs) for a in args]}
    if hint is type(None):
        return {"type": "null"}
    if hint is typing.Any or hint is object:
        return {}
    if hint is bool:
        return {"type": "boolean"}
    if hint is int:
        return {"type": "integer"}
    if hint is float:
        return {"type": ["number", "null"]}  # null: non-finite, said by the <field>_status sibling
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return {"enum": [m.value for m in hint]}
    if hint is str or (isinstance(hint, type) and issubclass(hint, str)):
        return {"type": "string"}
    if origin in (list, tuple, abc.Sequence, set, frozenset) or hint in (list, tuple):
        items = [a for a in args if a is not Ellipsis]
        if origin is tuple and len(items) > 1 and Ellipsis not in args:
            return {"type": "array", "prefixItems": [_type(a, defs) for a in items], "minItems": len(items)}
        return {"type": "array", **({"items": _type(items[0], defs)} if items else {})}
    if origin in (dict, abc.Mapping) or hint is dict:
        if not args:
            return {"type": "object"}
        value, status = _type(args[1], defs), _status_of(args[1])  # a number's status is a sibling key
        return {"type": "object", "additionalProperties": {"anyOf": [value, status]} if status else value}
    if dataclasses.is_dataclass(hint):
        if hint.__name__ not in defs:
            defs[hint.__name__] = {}  # a placeholder first: a dataclass may hold itself
            defs[hint.__name__] = _object(hint, defs)
        return {"$ref": f"#/$defs/{hint.__name__}"}
    return {"type": "string"}  # paths, dtypes, devices: written as their string


def _status_of(hint: Any) -> dict | None:
    """The ``<field>_status`` sibling's schema for a field holding numbers (or lists of them)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is float:
        return STATUS
    if origin in (typing.Union, types.UnionType):
        found = [_status_of(a) for a in args if a is not type(None)]
        return next((s for s in found if s is not None), None)
    if origin in (list, tuple) and args and args[0] is float:
        return {"type": "array", "items": {"anyOf": [STATUS, {"type": "null"}]}}
    return None
