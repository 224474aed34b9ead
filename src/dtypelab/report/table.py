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
import textwrap
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import InputError, did_you_mean
from .cells import format_cell
from .html import HTML_VIEWS, render_fragment

TEXT_WIDTH = 100
"""Characters a terminal table is made to fit (a 100-column terminal): the compact default columns of
every table are chosen for it, a long free-text cell beyond it becomes a numbered note, notes wrap at it."""

ALL_COLUMNS: tuple[str, ...] = ("all",)
"""The column choice that shows every column (``--columns all``; the library's default)."""

LONG_CELL = 72
"""Characters a text cell may take in a terminal table before it becomes a numbered note."""

MIN_CELL = 24
"""Characters a free-text cell keeps at least when a table is squeezed to a width (``ok <- first
crossing`` fits, a failure's reason does not)."""

STATUS_COLUMNS = frozenset({"status", "verdict"})
"""Columns whose cells say how a row went: coloured when they say anything but :data:`CALM_STATUSES`."""

CALM_STATUSES = frozenset({"", "ok", "within format noise", "near-lossless", "close"})
"""Status cells that need no attention (no colour)."""

Styler = Callable[[str, str], str]
"""``(text, role) -> text`` with the role's terminal style: roles are ``header``, ``failed`` (a row
whose cell says ``failed``) and ``warning`` (a status cell that is not calm)."""


@dataclass
class Table:
    """A titled grid of cells plus notes printed under it.

    ``default_columns`` is the compact set a terminal shows unless the user chooses (``--columns``):
    header names, shown in table order, the first column (the row's key) always; None: every column.
    A table declares it with its columns, so which columns are default is data, not command code."""

    title: str
    columns: list[str]
    rows: list[list[Any]]
    notes: list[str] = field(default_factory=list)
    default_columns: list[str] | None = None

    def to_text(self, width: int | None = None, style: Styler | None = None) -> str:
        """Aligned columns; a text cell longer than :data:`LONG_CELL` (a failure's reason) is cut to its
        first words and a number, and printed in full as that numbered note below the table, so one long
        reason does not make every row hundreds of columns wide. With ``width`` (characters), the widest
        free-text column is cut further until the table fits (never below :data:`MIN_CELL`) and notes
        wrap at it; ``style`` colours the header, failed rows and status warnings."""
        texts = [[format_cell(v) for v in row] for row in self.rows]
        caps = _caps(self.columns, texts, width)
        long_notes: dict[str, int] = {}
        body = [[_short_cell(t, long_notes, cap) for t, cap in zip(row, caps, strict=True)] for row in texts]
        widths = [max(len(r[i]) for r in [self.columns, *body]) for i in range(len(self.columns))]
        lines = [self.title, _line(self.columns, widths, ["header"] * len(widths), style, numeric=False),
                 "  ".join("-" * w for w in widths)]
        lines += [_line(cells, widths, _roles(self.columns, raw), style)
                  for raw, cells in zip(texts, body, strict=True)]
        notes = self.notes + [f"[{n}] {text}" for text, n in long_notes.items()]
        return "\n".join(lines + [line for note in notes for line in _wrap(note, width)])

    def to_html(self) -> str:
        head = "".join(f"<th>{html.escape(c)}</th>" for c in self.columns)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(format_cell(v))}</td>" for v in row) + "</tr>"
                       for row in self.rows)
        notes = "".join(f"<br>{html.escape(n)}" for n in self.notes)
        return (f"<b>{html.escape(self.title)}</b><table><thead><tr>{head}</tr></thead>"
                f"<tbody>{body}</tbody></table><small>{notes}</small>")

    def with_columns(self, choice: Sequence[str] | None) -> Table | None:
        """This table with the chosen columns: ``None`` its :attr:`default_columns` (and a note naming
        the ones left out), :data:`ALL_COLUMNS` all of them, else its key column and those of ``choice``
        it has (header names, case-insensitive); None when it has none of them."""
        if choice is None and self.default_columns is None or is_all_columns(choice):
            return self
        wanted = {c.lower() for c in (self.default_columns if choice is None else choice)}
        keep = [i for i, c in enumerate(self.columns) if i == 0 or c.lower() in wanted]
        if choice is not None and len(keep) == 1 and self.columns[0].lower() not in wanted:
            return None
        left_out = [c for i, c in enumerate(self.columns) if i not in keep]
        notes = list(self.notes)
        if choice is None and left_out:
            notes.append(f"{len(left_out)} more column(s) not shown: {', '.join(left_out)} (--columns all or "
                         "--json shows them)")
        rows = [[row[i] for i in keep] for row in self.rows]
        return Table(self.title, [self.columns[i] for i in keep], rows, notes)


def is_all_columns(choice: Sequence[str] | None) -> bool:
    return choice is not None and tuple(c.lower() for c in choice) == ALL_COLUMNS


def check_columns(tables: Sequence[Table], choice: Sequence[str] | None) -> None:
    """Refuse a chosen column no table has, with the closest header name.

    Raises:
        InputError: a name in ``choice`` is no column of ``tables`` (nor ``all``).
    """
    if choice is None or is_all_columns(choice):
        return
    known = list(dict.fromkeys(c for table in tables for c in table.columns))
    lower = {c.lower() for c in known}
    for name in choice:
        if name.lower() not in lower:
            raise InputError(f"unknown column {name!r}{did_you_mean(name, known)}: choose among "
                             f"{', '.join(known)}, or all")


def tables_text(tables: Sequence[Table], choice: Sequence[str] | None = ALL_COLUMNS, *,
                width: int | None = None, style: Styler | None = None) -> str:
    """The tables as text with the chosen columns (see :meth:`Table.with_columns`); a table holding
    none of the chosen columns is left out.

    Raises:
        InputError: a chosen column is in none of the tables.
    """
    check_columns(tables, choice)
    shown = [t for t in (table.with_columns(choice) for table in tables) if t is not None]
    return "\n\n".join(table.to_text(width, style) for table in shown)


def _caps(columns: list[str], texts: list[list[str]], width: int | None) -> list[int]:
    """Each column's longest cell before it becomes a note: :data:`LONG_CELL`, then, while the table is
    wider than ``width``, less for the widest free-text column (cells with spaces: reasons, not names)."""
    caps = [LONG_CELL] * len(columns)
    for _ in range(len(columns) if width else 0):
        widths = [max([len(c)] + [min(len(r[i]), caps[i]) for r in texts]) for i, c in enumerate(columns)]
        excess = sum(widths) + 2 * (len(widths) - 1) - width
        free = [i for i in range(len(columns)) if caps[i] > MIN_CELL
                and any(" " in r[i] and len(r[i]) > MIN_CELL for r in texts)]
        if excess <= 0 or not free:
            break
        widest = max(free, key=lambda i: widths[i])
        caps[widest] = max(MIN_CELL, widths[widest] - excess)
    return caps


def _short_cell(text: str, notes: dict[str, int], cap: int = LONG_CELL) -> str:
    """``failed: nothing to quantize …`` -> ``failed [1]``, with ``[1] failed: nothing …`` in ``notes``
    (text -> number: rows with the same long text share one note)."""
    if len(text) <= cap:
        return text
    number = notes.setdefault(text, len(notes) + 1)
    head = min((text.split(sep, 1)[0] for sep in (": ", "; ")), key=len)
    tag = f"[{number}]"
    return f"{head} {tag}" if len(head) <= LONG_CELL // 3 and len(head) + len(tag) < cap else tag


def _roles(columns: list[str], cells: list[str]) -> list[str | None]:
    """Each cell's style role: every cell ``failed`` when one says so, a status cell that is not calm
    ``warning``, else None."""
    if any(cell.startswith("failed") for cell in cells):
        return ["failed"] * len(cells)
    return ["warning" if column in STATUS_COLUMNS and cell not in CALM_STATUSES else None
            for column, cell in zip(columns, cells, strict=True)]


def _line(cells: list[str], widths: list[int], roles: list[str | None], style: Styler | None,
          numeric: bool = True) -> str:
    """One aligned line (numbers right, words left), trailing blanks dropped, each cell in its role's
    style (the padding outside the style, so alignment never depends on escape codes)."""
    last = max((i for i, c in enumerate(cells) if c), default=-1)
    parts = []
    for i, (cell, w) in enumerate(zip(cells, widths, strict=True)):
        right = numeric and _numeric(cell)
        pad = " " * (w - len(cell)) if i < last or right else ""
        shown = style(cell, roles[i]) if style and roles[i] and cell else cell
        parts.append(pad + shown if right else shown + pad)
    return "  ".join(parts[:last + 1]) if last >= 0 else ""


def _wrap(note: str, width: int | None) -> list[str]:
    """A note's lines at ``width`` characters (continuations indented; a word longer than the width, such
    as the spec grammar, is split too, so no line passes it); as it is without a width."""
    if width is None:
        return note.splitlines() or [""]
    return [line for part in note.splitlines() or [""]
            for line in textwrap.wrap(part, width, subsequent_indent="    ",
                                      break_on_hyphens=False) or [""]]


def _numeric(text: str) -> bool:
    return text.replace(",", "").replace(".", "").replace("-", "").replace("e", "").replace("+", "").isdigit()


JSON_KINDS: dict[str, tuple[str, int]] = {
    "ComparisonResult": ("comparison", 1),
    "LayerComparison": ("layers", 1),
    "HeadroomReport": ("headroom", 1),
    "WeightReport": ("weights", 1),
    "ModelInspection": ("model-inspection", 1),
    "CheckpointInspection": ("checkpoint-inspection", 2),  # 2: total_bytes -> stored_bytes
    "GgufInspection": ("gguf-inspection", 2),  # 2: total_bytes -> stored_bytes
    "ConversionResult": ("conversion", 1),
    "FormatsReport": ("formats", 2),  # 2: block a number (or null), granularity
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

    def to_text(self, columns: Sequence[str] | None = ALL_COLUMNS, *, width: int | None = None,
                style: Styler | None = None) -> str:
        """Every table as text: all columns by default; ``columns=None`` the compact default set, else
        the named ones (:func:`tables_text`), ``width`` in characters to fit, ``style`` for colour.

        Raises:
            InputError: a named column is in none of the tables.
        """
        return tables_text(self.to_tables(), columns, width=width, style=style)

    def _repr_html_(self) -> str:
        """What Jupyter shows: the HTML report's sections (charts and tables, the renderer ``--html``
        uses, :mod:`dtypelab.report.html`) for a kind that has a view, else the tables."""
        if kind_of(self)[0] in HTML_VIEWS:
            return f"<div class=\"dtypelab\">{render_fragment(json.loads(self.to_json()))}</div>"
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
