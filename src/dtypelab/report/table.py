"""Rendering results: the library returns dataclasses; this turns them into text, HTML or JSON.

Every result class mixes in :class:`TableMixin` and says how it looks as a :class:`Table`; the
CLI and Jupyter (``_repr_html_``) then render it without knowing what it holds.

Report layer: the building blocks every stage renders with; imports nothing of dtypelab.
"""

from __future__ import annotations

import dataclasses
import html
import json
import math
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
        cells = [self.columns] + [[format_cell(v) for v in row] for row in self.rows]
        widths = [max(len(r[i]) for r in cells) for i in range(len(self.columns))]
        lines = [self.title, "  ".join(c.ljust(w) for c, w in zip(cells[0], widths, strict=True)).rstrip(),
                 "  ".join("-" * w for w in widths)]
        lines += ["  ".join(c.rjust(w) if _numeric(c) else c.ljust(w) for c, w in zip(r, widths, strict=True))
                  .rstrip() for r in cells[1:]]
        return "\n".join(lines + self.notes)

    def to_html(self) -> str:
        head = "".join(f"<th>{html.escape(c)}</th>" for c in self.columns)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(format_cell(v))}</td>" for v in row) + "</tr>"
                       for row in self.rows)
        notes = "".join(f"<br>{html.escape(n)}" for n in self.notes)
        return (f"<b>{html.escape(self.title)}</b><table><thead><tr>{head}</tr></thead>"
                f"<tbody>{body}</tbody></table><small>{notes}</small>")


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


def to_jsonable(value: Any) -> Any:
    """Dataclasses, tuples and floats to plain JSON; NaN and inf become strings, never bare NaN."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)
                if not f.name.startswith("_") and f.repr}
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, bool | int | float | str) or value is None:
        return value
    return str(value)


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

    def to_json(self) -> str:
        return json.dumps(to_jsonable(self), indent=2)

    def __str__(self) -> str:
        return self.to_text()
