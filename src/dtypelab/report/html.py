"""One self-contained HTML report per result: tables and inline SVG charts, no network, no script needed.

Report layer: imports nothing of dtypelab but :mod:`dtypelab.report.cells`. Every view is built from a
result's ``--json`` document (a dict), so ``--html`` on a command, ``dtypelab report RESULT.json`` and a
notebook's ``_repr_html_`` are one renderer: :data:`HTML_VIEWS` maps a document's kind to the function
that turns it into sections (a kind with no entry gets the generic tables of its lists).

Why hand-written SVG rather than a plotting library (see ``docs/architecture.md``): the charts are
lines, bars, a strip and points; a matplotlib SVG of one 30-layer chart is ~60 kB of paths and needs
matplotlib where the report is rendered, Plotly's or Vega's bundles are 1-3.5 MB per file and run only
with JavaScript. Here a chart is a few kB of ``<polyline>`` / ``<rect>`` with a ``<title>`` per point
(the browser's tooltip, also without JavaScript), in the Okabe-Ito palette (made for colour-blind
readers) with a dash pattern per series, so a grey print still tells them apart. The only script is
a 1 kB table sorter; with JavaScript off every table and chart is still there.
"""

from __future__ import annotations

import datetime
import html
import math
import os
import platform
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .cells import format_cell

OKABE_ITO = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000", "#F0E442")
"""Okabe & Ito's palette for colour-blind readers (blue, vermillion, green, purple, orange, sky, black,
yellow), in the order series take them."""

DASHES = ("", "6 3", "2 2", "8 3 2 3", "1 3", "10 4")
"""One stroke pattern per series, so lines stay apart in a grey print."""

CHART_WIDTH, CHART_HEIGHT, MARGIN = 760, 300, (60, 12, 28, 96)  # px; margin: left, right, top, bottom
MAX_TABLE_ROWS = 2000  # beyond this a table shows its first rows and says how many it left out


@dataclass
class Series:
    """One line of a chart: its name and a y value per x position (None: no point there)."""

    name: str
    values: list[float | None]
    dashed: bool = False


@dataclass
class LineChart:
    """y by x position (layers in execution order), with horizontal reference lines and marked points."""

    title: str
    x_labels: list[str]
    series: list[Series]
    y_label: str
    references: list[tuple[float, str]] = field(default_factory=list)  # (y, label): a threshold, a floor
    marks: list[tuple[int, int, str]] = field(default_factory=list)  # (series index, x index, label)
    log_y: bool = False  # a log y axis when every value is positive (damages spanning decades)


@dataclass
class Bars:
    """Horizontal bars, one per label, longest first as given, with an optional reference value."""

    title: str
    labels: list[str]
    values: list[float]
    value_label: str
    reference: tuple[float, str] | None = None


@dataclass
class Strip:
    """A coloured cell per item along the depth (a plan's format per layer group), with its legend."""

    title: str
    labels: list[str]
    categories: list[str]


@dataclass
class Points:
    """Bytes against damage: named point sets, the first drawn as a line (the Pareto curve)."""

    title: str
    sets: list[tuple[str, list[tuple[float, float, str]]]]  # (name, [(x, y, label)])
    x_label: str
    y_label: str


Section = str  # an HTML fragment


def render_document(doc: dict, facts: dict[str, str] | None = None) -> str:
    """The whole page for one result document: facts, sections, a small sorter script, print-friendly CSS.
    The document itself is not embedded: it would double a ``--layers`` report's size, and the
    ``--json`` output is the machine-readable form (``dtypelab report`` renders it)."""
    kind = _kind(doc)
    title = f"dtypelab {kind} report"
    body = facts_table(doc, facts or {}) + render_fragment(doc)
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f'<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{html.escape(title)}</title><style>{CSS}</style></head><body>"
        f"<h1>{html.escape(title)}</h1>{body}"
        f"<script>{SORTER}</script></body></html>\n"
    )


def render_fragment(doc: dict) -> str:
    """The sections of one document (what a notebook cell shows): the kind's view, else its tables."""
    view = HTML_VIEWS.get(_kind(doc), generic_view)
    return "".join(f"<section>{section}</section>" for section in view(doc))


def write_html(path: str | os.PathLike, doc: dict, facts: dict[str, str] | None = None) -> int:
    """Write the report of ``doc`` to ``path`` whole or not at all (a temporary sibling renamed into
    place); returns its size in bytes."""
    path = Path(path)
    text = render_document(doc, facts)
    temporary = path.with_name(f".{path.name}.tmp")
    try:
        temporary.write_text(text, encoding="utf-8")
        temporary.replace(path)
    finally:
        temporary.unlink(missing_ok=True)
    return len(text.encode("utf-8"))


def run_facts(command: Sequence[str] = (), **extra: str) -> dict[str, str]:
    """The facts of this run: command line, versions, machine and date (UTC)."""
    import importlib.metadata

    def version(package: str) -> str:
        try:
            return importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            return "not installed"

    facts = {"command": " ".join(command)} if command else {}
    facts |= {key: value for key, value in extra.items() if value}
    facts |= {
        "dtypelab": version("dtypelab"),
        "torch": version("torch"),
        "python": platform.python_version(),
        "machine": f"{platform.machine()} {platform.system()}, {os.cpu_count()} CPUs",
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }
    return facts


def _kind(doc: dict) -> str:
    schema = doc.get("schema", "") if isinstance(doc, dict) else ""
    parts = schema.split("/")
    return parts[1] if len(parts) == 3 and parts[0] == "dtypelab" else "result"


# ---------------------------------------------------------------------------------- building blocks


def facts_table(doc: dict, facts: dict[str, str]) -> str:
    rows = [
        ("schema", doc.get("schema", "")),
        ("dtypelab version of the result", doc.get("dtypelab_version", "")),
    ]
    rows += list(facts.items())
    cells = "".join(
        f'<tr><th scope="row">{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>' for k, v in rows if v
    )
    return f'<section><h2>Run</h2><table class="facts">{cells}</table></section>'


def table_html(title: str, columns: list[str], rows: list[list[Any]], notes: Sequence[str] = ()) -> str:
    """A sortable table (click a header; numbers sort as numbers via ``data-v``); every cell escaped."""
    shown = rows[:MAX_TABLE_ROWS]
    head = "".join(f'<th scope="col"><button type="button">{html.escape(c)}</button></th>' for c in columns)
    body = "".join("<tr>" + "".join(_cell(v) for v in row) + "</tr>" for row in shown)
    more = (
        [f"{len(rows) - len(shown):,} more rows not shown (the JSON has them all)"]
        if len(rows) > len(shown)
        else []
    )
    note = "".join(f'<p class="note">{html.escape(n)}</p>' for n in [*notes, *more])
    return (
        f'<h2>{html.escape(title)}</h2><div class="scroll"><table class="sortable"><thead><tr>{head}'
        f"</tr></thead><tbody>{body}</tbody></table></div>{note}"
    )


def _cell(value: Any) -> str:
    text = format_cell(value)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return f"<td>{html.escape(text)}</td>"
    number = value if math.isfinite(value) else (1e308 if value > 0 else -1e308)
    return f'<td class="num" data-v="{number!r}">{html.escape(text)}</td>'


def line_chart(chart: LineChart) -> str:
    """SVG lines over the x positions; a ``<title>`` on every point gives its numbers on hover."""
    values = [v for s in chart.series for v in s.values if _finite(v)] + [y for y, _ in chart.references]
    if not values or not chart.x_labels:
        return _empty(chart.title)
    x_of = _axis(len(chart.x_labels))
    if chart.log_y and min(values) > 0:
        low, high = _padded(math.log10(min(values)), math.log10(max(values)))
        linear = _scale(low, high)
        y_of = lambda v: linear(math.log10(v)) if v > 0 else linear(low)  # noqa: E731
        ticks = [10.0**e for e in range(math.ceil(low), math.floor(high) + 1)]
        parts = _frame(chart.title, chart.y_label + " (log scale)", 10**low, 10**high, y_of, ticks)
    else:
        low, high = _padded(min(values), max(values))
        y_of = _scale(low, high)
        parts = _frame(chart.title, chart.y_label, low, high, y_of)
    for y, label in chart.references:
        parts.append(
            f'<line class="ref" x1="{MARGIN[0]}" x2="{CHART_WIDTH - MARGIN[1]}" '
            f'y1="{y_of(y):.1f}" y2="{y_of(y):.1f}"><title>{html.escape(label)}: '
            f'{format_cell(y)}</title></line><text class="reflabel" x="{CHART_WIDTH - MARGIN[1]}" '
            f'y="{y_of(y) - 3:.1f}" text-anchor="end">{html.escape(label)}</text>'
        )
    for index, series in enumerate(chart.series):
        parts.append(_polyline(series, index, x_of, y_of, chart.x_labels))
    for series_index, x_index, label in chart.marks:
        value = chart.series[series_index].values[x_index]
        if _finite(value):
            parts.append(
                f'<circle class="mark" cx="{x_of(x_index):.1f}" cy="{y_of(value):.1f}" r="6">'
                f"<title>{html.escape(label)}</title></circle>"
            )
    parts.append(_x_ticks(chart.x_labels, x_of))
    return _svg(chart.title, parts) + _legend([s.name for s in chart.series], dashed=True)


def _polyline(series: Series, index: int, x_of, y_of, labels: list[str]) -> str:
    colour, dash = OKABE_ITO[index % len(OKABE_ITO)], DASHES[index % len(DASHES)]
    runs, current = [], []
    for i, v in enumerate(series.values):  # a missing value breaks the line
        if _finite(v):
            current.append(f"{x_of(i):.1f},{y_of(v):.1f}")
        elif current:
            runs.append(current)
            current = []
    runs += [current] if current else []
    style = f'stroke="{colour}"' + (f' stroke-dasharray="{dash}"' if dash else "")
    lines = "".join(f'<polyline fill="none" stroke-width="2" {style} points="{" ".join(r)}"/>' for r in runs)
    dots = "".join(
        f'<circle cx="{x_of(i):.1f}" cy="{y_of(v):.1f}" r="3" fill="{colour}"><title>'
        f"{html.escape(series.name)} · {html.escape(labels[i])}: {format_cell(v)}</title></circle>"
        for i, v in enumerate(series.values)
        if _finite(v)
    )
    return f'<g class="series">{lines}{dots}</g>'


def bars(chart: Bars) -> str:
    """Horizontal bars with their values written beside them (readable without hovering)."""
    pairs = [(label, v) for label, v in zip(chart.labels, chart.values, strict=True) if _finite(v)]
    if not pairs:
        return _empty(chart.title)
    row, label_width = 18, min(320, 7 * max(len(label) for label, _ in pairs) + 8)
    width = CHART_WIDTH - label_width - 90
    top = max([v for _, v in pairs] + ([chart.reference[0]] if chart.reference else []))
    low = min(0.0, min(v for _, v in pairs))
    span = (top - low) or 1.0
    height = row * len(pairs) + 40
    parts = [f'<text class="title" x="4" y="14">{html.escape(chart.title)}</text>']
    for i, (label, v) in enumerate(pairs):
        y = 24 + i * row
        x0 = label_width + (0 - low) / span * width
        x1 = label_width + (v - low) / span * width
        parts.append(
            f'<text x="{label_width - 6}" y="{y + 12}" text-anchor="end">'
            f'{html.escape(_short(label, 44))}</text><rect x="{min(x0, x1):.1f}" y="{y + 2}" '
            f'width="{max(abs(x1 - x0), 1):.1f}" height="{row - 5}" fill="{OKABE_ITO[0]}">'
            f"<title>{html.escape(label)}: {format_cell(v)} {html.escape(chart.value_label)}</title>"
            f'</rect><text x="{max(x0, x1) + 4:.1f}" y="{y + 12}">{format_cell(v)}</text>'
        )
    if chart.reference:
        value, label = chart.reference
        x = label_width + (value - low) / span * width
        parts.append(
            f'<line class="ref" x1="{x:.1f}" x2="{x:.1f}" y1="20" y2="{height - 14}"><title>'
            f'{html.escape(label)}</title></line><text class="reflabel" x="{x:.1f}" '
            f'y="{height - 2}" text-anchor="middle">{html.escape(label)}</text>'
        )
    return _svg(chart.title, parts, height)


def strip(chart: Strip) -> str:
    """One cell per item, coloured by category, in order; the legend names the colours and the cells carry
    their category as text too (a pattern would otherwise be needed in grey print)."""
    if not chart.labels:
        return _empty(chart.title)
    names = list(dict.fromkeys(chart.categories))
    colour = {name: OKABE_ITO[i % len(OKABE_ITO)] for i, name in enumerate(names)}
    cell = (CHART_WIDTH - 8) / len(chart.labels)
    parts = [f'<text class="title" x="4" y="14">{html.escape(chart.title)}</text>']
    for i, (label, category) in enumerate(zip(chart.labels, chart.categories, strict=True)):
        short = category.split(":")[0][:5] if cell > 26 else ""
        parts.append(
            f'<rect class="cell" x="{4 + i * cell:.1f}" y="22" width="{max(cell - 1, 1):.1f}" '
            f'height="34" fill="{colour[category]}"><title>{html.escape(label)}: '
            f"{html.escape(category)}</title></rect>"
            + (
                f'<text class="celltext" x="{4 + (i + 0.5) * cell:.1f}" y="66" text-anchor="middle">'
                f"{html.escape(short)}</text>"
                if short
                else ""
            )
        )
    parts.append(
        f'<text x="4" y="84">first</text><text x="{CHART_WIDTH - 4}" y="84" '
        'text-anchor="end">last (execution order)</text>'
    )
    return _svg(chart.title, parts, 92) + _legend(names, colours=[colour[n] for n in names])


def points(chart: Points) -> str:
    """Scatter of (x, y) sets on a log x axis (bytes); the first set joined as a line."""
    every = [(x, y) for _, pts in chart.sets for x, y, _ in pts if _finite(x) and _finite(y) and x > 0]
    if not every:
        return _empty(chart.title)
    xs, ys = [math.log10(x) for x, _ in every], [y for _, y in every]
    x_low, x_high = _padded(min(xs), max(xs))
    y_low, y_high = _padded(min(0.0, min(ys)), max(ys))
    inner = CHART_WIDTH - MARGIN[0] - MARGIN[1]
    x_of = lambda x: MARGIN[0] + (math.log10(x) - x_low) / ((x_high - x_low) or 1) * inner  # noqa: E731
    y_of = _scale(y_low, y_high)
    parts = _frame(chart.title, chart.y_label, y_low, y_high, y_of)
    for index, (name, pts) in enumerate(chart.sets):
        colour = OKABE_ITO[index % len(OKABE_ITO)]
        shown = sorted((p for p in pts if _finite(p[0]) and _finite(p[1]) and p[0] > 0), key=lambda p: p[0])
        if index == 0 and len(shown) > 1:
            line = " ".join(f"{x_of(x):.1f},{y_of(y):.1f}" for x, y, _ in shown)
            parts.append(f'<polyline fill="none" stroke="{colour}" stroke-width="2" points="{line}"/>')
        shape = "circle" if index == 0 else "rect"
        for x, y, label in shown:
            cx, cy = x_of(x), y_of(y)
            tip = (f"<title>{html.escape(name)} · {html.escape(label)}: {format_cell(x)} bytes, "
                   f"{format_cell(y)}</title>")
            parts.append(
                f'<circle cx="{cx:.1f}" cy="{cy:.1f}" r="4" fill="{colour}">{tip}</circle>'
                if shape == "circle"
                else f'<rect x="{cx - 4:.1f}" y="{cy - 4:.1f}" width="8" height="8" fill="{colour}">'
                f'{tip}</rect><text x="{cx + 6:.1f}" y="{cy - 6:.1f}">{html.escape(label)}</text>'
            )
    for tick in log_ticks(10**x_low, 10**x_high):
        parts.append(f'<text class="tick" x="{x_of(tick):.1f}" y="{CHART_HEIGHT - MARGIN[3] + 16}" '
                     f'text-anchor="middle">{_bytes(tick)}</text>')
    parts.append(
        f'<text x="{CHART_WIDTH / 2:.0f}" y="{CHART_HEIGHT - MARGIN[3] + 36}" text-anchor="middle">'
        f"{html.escape(chart.x_label)} (log scale)</text>"
    )
    return _svg(chart.title, parts) + _legend([name for name, _ in chart.sets])


def _frame(title: str, y_label: str, low: float, high: float, y_of,
           ticks: list[float] | None = None) -> list[str]:
    """Title, the y axis label (rotated, left of the ticks) and grid lines at round values (``ticks``,
    else :func:`nice_ticks` of the range)."""
    middle = (MARGIN[2] + CHART_HEIGHT - MARGIN[3]) / 2
    parts = [
        f'<text class="title" x="4" y="16">{html.escape(title)}</text>',
        f'<text class="axis" transform="translate(12,{middle:.0f}) rotate(-90)" text-anchor="middle">'
        f"{html.escape(y_label)}</text>",
    ]
    for y in nice_ticks(low, high) if ticks is None else ticks:
        parts.append(
            f'<line class="grid" x1="{MARGIN[0]}" x2="{CHART_WIDTH - MARGIN[1]}" '
            f'y1="{y_of(y):.1f}" y2="{y_of(y):.1f}"/><text class="tick" x="{MARGIN[0] - 4}" '
            f'y="{y_of(y) + 4:.1f}" text-anchor="end">{format_cell(y)}</text>'
        )
    return parts


def nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
    """Round values (1, 2 or 5 times a power of ten apart) inside [low, high], about ``count`` of them."""
    span = high - low
    if not span > 0 or not math.isfinite(span):
        return [low]
    raw = span / count
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    first = math.ceil(low / step) * step
    return [round(first + i * step, 12) for i in range(int((high - first) / step) + 1)]


def _x_ticks(labels: list[str], x_of) -> str:
    step = max(1, math.ceil(len(labels) / 12))
    return "".join(
        f'<text class="tick" transform="translate({x_of(i):.1f},{CHART_HEIGHT - MARGIN[3] + 10}) '
        f'rotate(30)">{html.escape(_short(labels[i], 22))}</text>'
        for i in range(0, len(labels), step)
    )


def log_ticks(low: float, high: float) -> list[float]:
    """1, 2 and 5 times powers of ten inside [low, high] (all three only when few decades are shown)."""
    if not 0 < low < high:
        return []
    ticks = [m * 10**e for e in range(math.floor(math.log10(low)), math.ceil(math.log10(high)) + 1)
             for m in (1, 2, 5)]
    inside = [t for t in ticks if low <= t <= high]
    return inside if len(inside) <= 10 else [t for t in inside if str(t).startswith("1")]


def _bytes(value: float) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if value >= size:
            return f"{value / size:g} {unit}"
    return f"{value:g} B"


def _axis(count: int):
    inner = CHART_WIDTH - MARGIN[0] - MARGIN[1]
    return lambda i: MARGIN[0] + (i + 0.5) * inner / count


def _scale(low: float, high: float):
    inner = CHART_HEIGHT - MARGIN[2] - MARGIN[3]
    return lambda y: MARGIN[2] + (high - y) / ((high - low) or 1) * inner


def _padded(low: float, high: float) -> tuple[float, float]:
    pad = (high - low) * 0.08 or abs(high) * 0.1 or 1.0
    return low - pad, high + pad


def _svg(title: str, parts: list[str], height: int = CHART_HEIGHT) -> str:
    return (
        f'<figure><svg role="img" viewBox="0 0 {CHART_WIDTH} {height}" width="100%" '
        f'xmlns="http://www.w3.org/2000/svg"><title>{html.escape(title)}</title>{"".join(parts)}</svg>'
        "</figure>"
    )


def _legend(names: list[str], dashed: bool = False, colours: list[str] | None = None) -> str:
    items = []
    for i, name in enumerate(names):
        colour = colours[i] if colours else OKABE_ITO[i % len(OKABE_ITO)]
        dash = DASHES[i % len(DASHES)] if dashed else ""
        key = (
            f'<svg width="28" height="10" aria-hidden="true"><line x1="0" x2="28" y1="5" y2="5" '
            f'stroke="{colour}" stroke-width="3"'
            + (f' stroke-dasharray="{dash}"' if dash else "")
            + "/></svg>"
        )
        items.append(f"<li>{key} {html.escape(name)}</li>")
    return f'<ul class="legend">{"".join(items)}</ul>'


def _empty(title: str) -> str:
    return f'<p class="note">{html.escape(title)}: nothing to draw (no finite values).</p>'


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _short(text: str, limit: int) -> str:
    return text if len(text) <= limit else "…" + text[-(limit - 1) :]


# ------------------------------------------------------------------------------------------- views


def flatten(record: dict, prefix: str = "") -> dict[str, Any]:
    """A JSON object's scalars by dotted name (``metrics.sqnr_db``); lists of scalars joined."""
    flat: dict[str, Any] = {}
    for key, value in record.items():
        name = f"{prefix}{key}"
        if key.endswith("_status"):
            continue
        if isinstance(value, dict):
            flat |= flatten(value, name + ".")
        elif isinstance(value, list):
            if all(not isinstance(v, dict | list) for v in value) and len(value) <= 8:
                flat[name] = ", ".join(format_cell(v) for v in value)
        else:
            status = record.get(f"{key}_status")
            flat[name] = (
                {"inf": math.inf, "-inf": -math.inf, "nan": math.nan}.get(status, value)
                if value is None and isinstance(status, str)
                else value
            )
    return flat


def records_table(
    title: str, records: list[dict], columns: Sequence[str] | None = None, notes: Sequence[str] = ()
) -> str:
    """A list of JSON objects as a table: ``columns`` (dotted names) or every scalar field they hold."""
    flat = [flatten(r) for r in records if isinstance(r, dict)]
    names = list(columns) if columns else list(dict.fromkeys(k for r in flat for k in r))
    return table_html(title, names, [[r.get(c) for c in names] for r in flat], notes)


def generic_view(doc: dict) -> list[Section]:
    """Every list of objects in the document as a table, its other scalars as one more."""
    sections = [
        records_table(key.replace("_", " "), value)
        for key, value in doc.items()
        if isinstance(value, list) and value and all(isinstance(v, dict) for v in value)
    ]
    scalars = {k: v for k, v in doc.items() if not isinstance(v, list | dict) and k not in ("schema",)}
    if scalars:
        sections.append(table_html("summary", list(scalars), [list(scalars.values())]))
    return sections


def comparison_view(doc: dict) -> list[Section]:
    """The variants' SQNR as bars, their table, and the next-token report of a causal LM."""
    variants = doc.get("variants", [])
    columns = ["name", "stored_bytes", "bits_per_element", "metrics.sqnr_db", "metrics.kl_divergence",
               "metrics.top1_agreement", "metrics.max_abs_diff", "embedding_cosine_mean",
               "embedding_cosine_min", "status", "failure"]
    present = [c for c in columns if any(c in flatten(v) for v in variants)]
    sqnr = [flatten(v).get("metrics.sqnr_db") for v in variants]
    chart = bars(Bars("SQNR of the output against float32, dB (higher is closer)",
                      [v.get("name", "") for v in variants], [s if _finite(s) else math.nan for s in sqnr],
                      "dB")) if any(_finite(s) for s in sqnr) else ""
    notes = [f"{doc.get('positions', 0):,} positions compared; the float32 reference stores "
             f"{format_cell(doc.get('reference_stored_bytes'))} bytes"]
    sections = [chart + records_table("Variants", variants, present, notes)]
    with_tokens = [{"name": v.get("name"), **v["next_token"]} for v in variants if v.get("next_token")]
    if with_tokens:
        sections.append(records_table("Next-token report (llama.cpp --kl-divergence)", with_tokens,
                                      ["name", "candidate_perplexity", "ln_ppl_ratio", "kl_mean", "kl_stderr",
                                       "kl_p99", "same_top_p", "positions"],
                                      [f"reference (float32) perplexity "
                                       f"{format_cell(with_tokens[0].get('reference_perplexity'))}"]))
    return sections


def layers_view(doc: dict) -> list[Section]:
    """Per variant: SQNR by layer in execution order, the format's noise floor, the threshold, the first
    layer below it marked; then the variant's rows."""
    sections = []
    threshold = doc.get("threshold_db")
    for variant in doc.get("variants", []):
        rows = variant.get("rows", [])
        names = [r.get("name") or "(model)" for r in rows]
        sqnr = [_status_value(r.get("metrics") or {}, "sqnr_db") for r in rows]
        floor = [_status_value(r, "floor_db") for r in rows]
        series = [
            Series(f"{variant.get('name')} SQNR dB", sqnr),
            Series("format noise floor dB", floor, True),
        ]
        crossing = variant.get("first_crossing")
        marks = (
            [(0, names.index(crossing), f"first below {format_cell(threshold)} dB: {crossing}")]
            if crossing in names
            else []
        )
        refs = [(threshold, f"threshold {format_cell(threshold)} dB")] if _finite(threshold) else []
        chart = line_chart(
            LineChart(
                f"{variant.get('name')}: SQNR by layer ({doc.get('mode', '')})",
                names,
                series,
                "SQNR dB",
                refs,
                marks,
            )
        )
        verdict = (
            f"verdict: {variant.get('verdict', '')}; first layer below the threshold: {crossing or 'none'}"
        )
        sections.append(
            chart
            + records_table(
                f"{variant.get('name')}: layers",
                rows,
                ["name", "module_type", "metrics.sqnr_db", "floor_db", "added_relative_error", "verdict"],
                [verdict],
            )
        )
    return sections


def headroom_view(doc: dict) -> list[Section]:
    rows = doc.get("rows", [])
    sections = []
    for fmt in dict.fromkeys(r.get("format") for r in rows):
        mine = [r for r in rows if r.get("format") == fmt]
        bits = [_status_value(r, "headroom_bits") for r in mine]
        chart = bars(
            Bars(
                f"{fmt}: headroom bits per module (below 0: overflows)",
                [r.get("name") or "(model)" for r in mine],
                [b if _finite(b) else math.nan for b in bits],
                "bits",
                (0.0, "overflow"),
            )
        )
        keep = (doc.get("keep") or {}).get(fmt)
        note = (
            [
                f"keep in float32 for {fmt}: {', '.join(keep) if keep else 'nothing'} "
                f"({(doc.get('keep_status') or {}).get(fmt, '')}); headroom bits: log2 of the format's "
                "largest value over the module's largest output on these inputs"
            ]
            if keep is not None
            else []
        )
        sections.append(
            chart
            + records_table(
                f"{fmt}: modules",
                mine,
                [
                    "name",
                    "module_type",
                    "headroom_bits",
                    "activations.absmax",
                    "activations.overflowed",
                    "activations.flushed_to_zero",
                    "activations.subnormal",
                    "verdict",
                ],
                note,
            )
        )
    return sections


def conversion_view(doc: dict) -> list[Section]:
    tensors = doc.get("tensors", [])
    damaged = sorted(
        (t for t in tensors if (t.get("overflowed") or 0) + (t.get("flushed_to_zero") or 0)),
        key=lambda t: -((t.get("overflowed") or 0) + (t.get("flushed_to_zero") or 0)),
    )
    chart = (
        bars(
            Bars(
                "Damaged tensors: values overflowed (clipped) + flushed to zero, most first",
                [t.get("name", "") for t in damaged[:40]],
                [(t.get("overflowed") or 0) + (t.get("flushed_to_zero") or 0) for t in damaged[:40]],
                "values",
            )
        )
        if damaged
        else '<p class="note">No tensor lost a value to overflow or flush to zero.</p>'
    )
    columns = [
        "name",
        "source_dtype",
        "to",
        "action",
        "numel",
        "overflowed",
        "flushed_to_zero",
        "subnormal",
        "max_rel_error",
        "sqnr_db",
    ]
    present = [c for c in columns if any(c in flatten(t) for t in tensors)]
    ranked = damaged + [t for t in tensors if t not in damaged]
    return [chart + records_table(f"Tensors ({len(tensors):,}), damaged first", ranked, present)]


def sensitivity_view(doc: dict) -> list[Section]:
    scores = doc.get("scores", [])
    groups = [g.get("name", "") for g in doc.get("groups", [])]
    series = []
    for fmt in doc.get("formats", []):
        by_group = {s.get("group"): s for s in scores if s.get("fmt") == fmt}
        series.append(Series(fmt, [by_group.get(g, {}).get("predicted") for g in groups]))
    chart = (
        line_chart(
            LineChart(
                f"Predicted damage of each layer group alone ({doc.get('metric', '')})",
                groups,
                series,
                doc.get("metric", ""),
                log_y=True,
            )
        )
        if groups
        else ""
    )
    return [
        chart
        + records_table("Scores", scores, ["group", "fmt", "stored_bytes", "predicted", "exact", "problem"])
    ]


def plan_view(doc: dict) -> list[Section]:
    rows = doc.get("rows", [])
    chart = strip(
        Strip(
            "Format per layer group, in execution order",
            [r.get("group", "") for r in rows],
            [r.get("fmt", "") for r in rows],
        )
    )
    measured = doc.get("measured") or {}
    notes = [
        f"budget {((doc.get('budget') or {}).get('text', ''))}: planned "
        f"{format_cell(doc.get('planned_bytes'))} "
        f"bytes of {format_cell(doc.get('limit_bytes'))} allowed"
    ]
    if measured:
        notes.append(
            f"measured on {measured.get('text', '')}: {format_cell(measured.get('damage'))} "
            f"({measured.get('what', '')})"
        )
    return [
        chart
        + records_table(
            "Plan", rows, ["group", "fmt", "stored_bytes", "predicted_damage", "constraint"], notes
        )
    ]


def plan_sweep_view(doc: dict) -> list[Section]:
    fixed = doc.get("fixed_bytes") or 0
    plans = doc.get("plans", [])

    def damage(result: dict) -> float | None:
        measured = result.get("measured") or {}
        return (
            measured.get("damage")
            if measured
            else sum(r.get("predicted_damage") or 0 for r in result.get("rows", []))
        )

    curve = [
        (fixed + (p.get("planned_bytes") or 0), damage(p), (p.get("budget") or {}).get("text", ""))
        for p in plans
    ]
    uniform = [
        (
            fixed + sum(c.get("stored_bytes", 0) for c in (entry[1].get("layers") or {}).values()),
            (entry[2] or {}).get("damage"),
            entry[0],
        )
        for entry in doc.get("uniform", [])
        if isinstance(entry, list) and len(entry) == 3
    ]
    measured = any(p.get("measured") for p in plans)
    what = "measured damage" if measured else "predicted damage"
    chart = points(
        Points(
            f"Checkpoint bytes against {what}: plans (line) and uniform formats (squares)",
            [("plans", curve), ("uniform formats", uniform)],
            "checkpoint bytes",
            what,
        )
    )
    sections = [
        chart
        + table_html("Plans", ["budget", "checkpoint bytes", what], [[label, x, y] for x, y, label in curve])
    ]
    sections += [s for p in plans[:1] for s in plan_view(p)]
    return sections


def _status_value(record: dict, key: str) -> float | None:
    value = record.get(key)
    status = record.get(f"{key}_status")
    if value is None and isinstance(status, str):
        return {"inf": math.inf, "-inf": -math.inf, "nan": math.nan}.get(status)
    return value


HTML_VIEWS: dict[str, Callable[[dict], list[Section]]] = {
    "comparison": comparison_view,
    "layers": layers_view,
    "headroom": headroom_view,
    "conversion": conversion_view,
    "sensitivity": sensitivity_view,
    "plan": plan_view,
    "plan-sweep": plan_sweep_view,
}
"""A document kind -> its view; a kind not listed is shown by :func:`generic_view`."""

CSS = """
body{font:14px/1.45 system-ui,-apple-system,'Segoe UI',sans-serif;margin:1.5em auto;max-width:1000px;
padding:0 1em;color:#111}
h1{font-size:1.4em}h2{font-size:1.1em;margin-top:1.4em}
table{border-collapse:collapse;margin:.4em 0;font-variant-numeric:tabular-nums}
th,td{border-bottom:1px solid #ccc;padding:2px 8px;text-align:left;vertical-align:top}
td.num{text-align:right}
th button{font:inherit;font-weight:600;border:0;background:none;padding:0;cursor:pointer}
table.facts th{font-weight:600;padding-right:1.5em}.scroll{overflow-x:auto}
.note{color:#444;font-size:.92em;margin:.2em 0}
svg text{font-size:11px;fill:#222}svg .title{font-size:13px;font-weight:600}
svg .grid{stroke:#e3e3e3}svg .ref{stroke:#000;stroke-dasharray:4 3}svg .reflabel{font-size:10px}
svg .mark{fill:none;stroke:#000;stroke-width:2}svg .tick{font-size:10px}
ul.legend{list-style:none;padding:0;display:flex;flex-wrap:wrap;gap:1.2em;margin:.2em 0}
figure{margin:.6em 0}
@media print{body{max-width:none}th button{cursor:auto}.scroll{overflow:visible}}
"""

SORTER = """
document.querySelectorAll('table.sortable').forEach(function(t){
 t.querySelectorAll('th button').forEach(function(b,i){
  b.addEventListener('click',function(){
   var body=t.tBodies[0],rows=Array.prototype.slice.call(body.rows),up=b.dataset.dir!=='up';
   rows.sort(function(x,y){var a=x.cells[i],c=y.cells[i];
    var p=a.dataset.v!==undefined&&c.dataset.v!==undefined?(parseFloat(a.dataset.v)-parseFloat(c.dataset.v))
     :a.textContent.localeCompare(c.textContent);return up?p:-p;});
   rows.forEach(function(r){body.appendChild(r);});b.dataset.dir=up?'up':'down';});});});
"""
