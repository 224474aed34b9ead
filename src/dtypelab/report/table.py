"""Rendering results: the library returns dataclasses; this turns them into text, HTML or JSON.

Every result class mixes in :class:`TableMixin` and says how it looks as a :class:`Table`; the
CLI and Jupyter (``_repr_html_``) then render it without knowing what it holds.

Report layer: the building blocks every stage renders with; imports nothing of dtypelab.
"""

from __future__ import annotations

import dataclasses
import html
import importlib.metadata
import json
import math
import re
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Table:
    """A titled grid of cells plus notes printed under it."""

    title: str
    columns: list[str]
    rows: list[list[Any]]
    notes: list[str] = field(default_factory=list)

    def to_text(self) -> str:
        """Aligned columns; a text cell longer than :data:`LONG_CELL` (a failure's reason) is cut to its
        first words and a number, and printed in full as that numbered note below the table, so one long
        reason does not make every row hundreds of columns wide."""
        long_notes: list[str] = []
        body = [[_short_cell(format_cell(v), long_notes) for v in row] for row in self.rows]
        cells = [self.columns] + body
        widths = [max(len(r[i]) for r in cells) for i in range(len(self.columns))]
        lines = [self.title, "  ".join(c.ljust(w) for c, w in zip(cells[0], widths, strict=True)).rstrip(),
                 "  ".join("-" * w for w in widths)]
        lines += ["  ".join(c.rjust(w) if _numeric(c) else c.ljust(w) for c, w in zip(r, widths, strict=True))
                  .rstrip() for r in cells[1:]]
        return "\n".join(lines + self.notes + long_notes)

    def to_html(self) -> str:
        head = "".join(f"<th>{html.escape(c)}</th>" for c in self.columns)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(format_cell(v))}</td>" for v in row) + "</tr>"
                       for row in self.rows)
        notes = "".join(f"<br>{html.escape(n)}" for n in self.notes)
        return (f"<b>{html.escape(self.title)}</b><table><thead><tr>{head}</tr></thead>"
                f"<tbody>{body}</tbody></table><small>{notes}</small>")


LONG_CELL = 72
"""Characters a text cell may take in a terminal table before it becomes a numbered note."""


def _short_cell(text: str, notes: list[str]) -> str:
    """``failed: nothing to quantize …`` -> ``failed [1]``, with ``[1] failed: nothing …`` in ``notes``."""
    if len(text) <= LONG_CELL:
        return text
    notes.append(f"[{len(notes) + 1}] {text}")
    head = min((text.split(sep, 1)[0] for sep in (": ", "; ")), key=len)
    return f"{head} [{len(notes)}]" if len(head) <= LONG_CELL // 3 else f"[{len(notes)}]"


def format_cell(value: Any) -> str:
    """Floats to 4 significant digits (more for tiny/huge values), ints with separators."""
    if isinstance(value, bool) or value is None:
        return "" if value is None else str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        return f"{value:.7f}" if 0.999 < abs(value) < 1 else f"{value:.4g}"  # cosines near 1
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _numeric(text: str) -> bool:
    return text.replace(",", "").replace(".", "").replace("-", "").replace("e", "").replace("+", "").isdigit()


JSON_KINDS: dict[str, tuple[str, int]] = {
    "ComparisonResult": ("comparison", 1),
    "LayerComparison": ("layers", 1),
    "HeadroomReport": ("headroom", 1),
    "WeightReport": ("weights", 1),
    "ModelInspection": ("model-inspection", 1),
    "CheckpointInspection": ("checkpoint-inspection", 1),
    "GgufInspection": ("gguf-inspection", 1),
    "ConversionResult": ("conversion", 1),
    "FormatsReport": ("formats", 1),
    "CalibrationReport": ("calibration", 1),
    "SensitivityResult": ("sensitivity", 1),
    "PlanResult": ("plan", 1),
    "PlanSweep": ("plan-sweep", 1),
    "LeftoverReport": ("leftovers", 1),
}
"""Every result that renders as JSON: its class name -> (kind, schema version). A document of it says
``"schema": "dtypelab/<kind>/<version>"``; its JSON Schema is derived from the dataclass
(:func:`dtypelab.report.schema.json_schema`) and ships as ``report/schemas/<kind>.json``. A new result
is one entry here (then regenerate the schemas, see ``tests/test_json_contract.py``); bump the version
when a field changes meaning or disappears."""

COMPOSITE_KINDS: dict[str, tuple[int, dict[str, str]]] = {
    "headroom-weights": (1, {"headroom": "HeadroomReport", "weights": "WeightReport"}),
}
"""Documents holding several results under one key each (``headroom --weights --json``): kind ->
(version, {key: result class name})."""

NON_FINITE = {"inf": math.inf, "-inf": -math.inf, "nan": math.nan}
"""The one convention for non-finite numbers: the field is ``null`` and a sibling ``<field>_status``
says which (``"sqnr_db": null, "sqnr_db_status": "inf"``); for a list, ``<field>_status`` is a list of
the same length, ``null`` where the value is finite. A ``null`` without a status is "not measured"."""


def schema_id(kind: str, version: int) -> str:
    return f"dtypelab/{kind}/{version}"


def kind_of(result: object) -> tuple[str, int]:
    """The registered (kind, version) of a result, by its class or the nearest registered base; an
    unregistered class (a caller's own result) is its kebab-case name at version 0: no shipped schema."""
    for cls in type(result).__mro__:
        if cls.__name__ in JSON_KINDS:
            return JSON_KINDS[cls.__name__]
    return re.sub(r"(?<!^)(?=[A-Z])", "-", type(result).__name__.lstrip("_")).lower(), 0


def json_document(result: object, body: dict | None = None) -> str:
    """``result`` (or ``body``, the result's own JSON dict) as strict JSON with its schema id and
    dtypelab's version first; a NaN or inf left anywhere raises instead of writing bare ``NaN``."""
    kind, version = kind_of(result)
    return dump_document(kind, version, to_jsonable(result) if body is None else body)


def composite_document(kind: str, parts: dict[str, object]) -> str:
    """One document of several results (``COMPOSITE_KINDS``): each under its key, as its own body."""
    version, expected = COMPOSITE_KINDS[kind]
    if set(parts) != set(expected):  # a programming error, not user input
        raise KeyError(f"a {kind} document holds {sorted(expected)}, not {sorted(parts)}")
    return dump_document(kind, version, {key: _body(part) for key, part in parts.items()})


def dump_document(kind: str, version: int, body: dict) -> str:
    document = {"schema": schema_id(kind, version), "dtypelab_version": package_version(), **body}
    return json.dumps(document, indent=2, allow_nan=False)


def _body(result: object) -> dict:
    body = getattr(result, "json_body", None)
    return body() if callable(body) else to_jsonable(result)


def package_version() -> str:
    """The installed dtypelab version (``"unknown"`` in a bare source tree)."""
    try:
        return importlib.metadata.version("dtypelab")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover - not installed
        return "unknown"


def to_jsonable(value: Any) -> Any:
    """Dataclasses, dicts, tuples and scalars to plain JSON: numbers stay numbers (numpy and 0-d torch
    scalars too), and a non-finite float becomes ``null`` with a ``<field>_status`` sibling
    (:data:`NON_FINITE`), so the document is strict JSON that any parser reads.

    This is the one place a result becomes JSON."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _jsonable_object((f.name, getattr(value, f.name)) for f in dataclasses.fields(value)
                                if not f.name.startswith("_") and f.repr)
    if isinstance(value, dict):
        return _jsonable_object((str(k), v) for k, v in value.items())
    if isinstance(value, list | tuple):
        return [to_jsonable(v) for v in value]
    if isinstance(value, bool | int | str) or value is None:
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if _is_scalar(value):
        return to_jsonable(value.item())
    return str(value)


def _jsonable_object(items) -> dict:
    out: dict[str, Any] = {}
    for key, value in items:
        out[key] = to_jsonable(value)
        status = _non_finite_status(value)
        if status is not None:
            out[f"{key}_status"] = status
    return out


def _non_finite_status(value: Any) -> str | list | None:
    """``"inf"`` / ``"-inf"`` / ``"nan"`` for a non-finite number, a list of those (None where finite)
    for a list holding one; None otherwise."""
    if _is_scalar(value) and not isinstance(value, bool | int | str):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, list | tuple):
        statuses = [_non_finite_status(v) if not isinstance(v, list | tuple | dict) else None for v in value]
        return statuses if any(isinstance(s, str) for s in statuses) else None
    return None


def _is_scalar(value: Any) -> bool:
    """A numpy scalar or a one-element torch tensor: something with ``.item()`` giving a number."""
    item, size = getattr(value, "item", None), getattr(value, "size", None)
    numel = getattr(value, "numel", None)
    if not callable(item):
        return False
    if callable(numel):
        return numel() == 1 and getattr(value, "ndim", 1) == 0
    return size in (1, None) and getattr(value, "ndim", 0) == 0


class TableMixin:
    """Gives a result dataclass text, HTML and JSON renderings from its :meth:`to_table`."""

    def to_table(self) -> Table:  # pragma: no cover - every result overrides it
        raise NotImplementedError

    def to_tables(self) -> list[Table]:
        """Every table the result shows, main one first; results with a second report override this."""
        return [self.to_table()]

    def to_text(self) -> str:
        return "\n\n".join(table.to_text() for table in self.to_tables())

    def _repr_html_(self) -> str:
        return "<br>".join(table.to_html() for table in self.to_tables())

    def json_body(self) -> dict:
        """The result as a JSON object, without the schema stamp; results that add fields override it."""
        return to_jsonable(self)

    def to_json(self) -> str:
        """Strict JSON, ``"schema": "dtypelab/<kind>/<version>"`` and ``"dtypelab_version"`` first
        (:data:`JSON_KINDS`)."""
        return json_document(self, self.json_body())

    def __str__(self) -> str:
        return self.to_text()
