"""A picture of where the error comes from: SQNR by layer, one line per variant.

matplotlib is an optional peer (``pip install dtypelab[plot]``); it is imported only here, with the
Agg backend, so plotting works on a headless machine and never opens a window.

Report layer: it draws any result shaped like :class:`LayerChart` (``compare_layers``' result is one) and
imports nothing above :mod:`dtypelab.errors`, so every stage can render through it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from ..errors import InputError


class LayerChart(Protocol):
    """What the chart reads: variants, each with named rows carrying ``sqnr_db``, plus the threshold."""

    threshold_db: float
    variants: Sequence

PLOT_SUFFIXES = (".png", ".svg")


def plot_layers(result: LayerChart, path: str | Path) -> Path:
    """Write the SQNR-by-layer chart of ``result`` to ``path`` (``.png`` or ``.svg``).

    Layers run along x in execution order; each variant is a line of output SQNR in dB. Layers
    whose variant output holds inf/NaN are drawn as red crosses on the x axis (their SQNR is not a
    number), exact layers (infinite SQNR) at the top edge, the threshold as a dashed line and each
    variant's first crossing as a circle. The file is written whole or not at all.

    Returns:
        The path written.
    """
    path = _checked(path)
    plt = _pyplot()
    return _save(plt, _draw(plt, result), path)


def _checked(path: str | Path) -> Path:
    path = Path(path)
    if path.suffix.lower() not in PLOT_SUFFIXES:
        raise InputError(f"cannot plot to {path.name!r}: use a file name ending in .png or .svg")
    return path


def _save(plt, figure, path: Path) -> Path:
    """Write ``figure`` whole or not at all (a partial sibling renamed into place)."""
    partial = path.with_name(path.name + ".partial")
    try:
        with plt.rc_context({"svg.fonttype": "none"}):  # SVG text stays text: searchable, selectable
            figure.savefig(partial, format=path.suffix[1:].lower(), bbox_inches="tight")
        partial.replace(path)
    finally:
        plt.close(figure)
        partial.unlink(missing_ok=True)
    return path


@dataclass(frozen=True)
class ParetoPoint:
    """One point of a bytes-against-damage chart: ``plan`` points join into the curve, ``uniform`` ones
    stand beside it. ``stderr`` draws an error bar (None: none)."""

    label: str
    stored_bytes: int
    damage: float
    stderr: float | None = None
    kind: str = "plan"


def plot_pareto(points: Sequence[ParetoPoint], path: str | Path, damage_label: str = "KL (nats)") -> Path:
    """Write the Pareto chart of a plan sweep: checkpoint megabytes along x, measured damage along y (log
    scale), the plans as a line with error bars and the uniform formats as labelled squares.

    Returns:
        The path written.
    """
    path = _checked(path)
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(7, 4.5))
    plans = sorted((p for p in points if p.kind == "plan"), key=lambda p: p.stored_bytes)
    axes.errorbar([p.stored_bytes / 1e6 for p in plans], [p.damage for p in plans],
                  yerr=[p.stderr or 0.0 for p in plans], marker="o", color="#0072B2", label="plan", capsize=3)
    for p in (p for p in points if p.kind != "plan"):
        axes.errorbar([p.stored_bytes / 1e6], [p.damage], yerr=[p.stderr or 0.0], marker="s", color="#D55E00",
                      capsize=3, linestyle="none")
        axes.annotate(p.label, (p.stored_bytes / 1e6, p.damage), textcoords="offset points", xytext=(5, 5))
    if all(p.damage > 0 for p in points):
        axes.set_yscale("log")
    axes.set_xlabel("checkpoint MB (tensor bytes, 10^6)")
    axes.set_ylabel(damage_label)
    axes.grid(True, alpha=0.3)
    axes.legend()
    return _save(plt, figure, path)


def _pyplot():
    try:
        import matplotlib
    except ImportError as exc:
        raise InputError("--plot needs matplotlib: pip install 'dtypelab[plot]'") from exc
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    return plt


def _draw(plt, result: LayerChart):
    names = [r.name for r in result.variants[0].rows] if result.variants else []
    figure, axes = plt.subplots(figsize=(min(max(6.0, 0.3 * len(names) + 2), 24.0), 5.0))
    ceiling = _ceiling(result)
    for variant in result.variants:
        values = [r.metrics.sqnr_db for r in variant.rows]
        shown = [ceiling if v == math.inf else (v if math.isfinite(v) else math.nan) for v in values]
        line, = axes.plot(range(len(shown)), shown, marker=".", label=variant.name)
        broken = [i for i, r in enumerate(variant.rows) if r.metrics.nan_count or r.metrics.inf_count]
        axes.scatter(broken, [0] * len(broken), marker="x", color="red", zorder=3, s=60)
        if variant.first_crossing in names:
            i = names.index(variant.first_crossing)
            axes.scatter([i], [shown[i] if math.isfinite(shown[i]) else 0], s=120, facecolors="none",
                         edgecolors=line.get_color(), zorder=4)
    axes.axhline(result.threshold_db, linestyle="--", color="grey",
                 label=f"threshold {result.threshold_db:g} dB")
    if any(r.metrics.nan_count or r.metrics.inf_count for v in result.variants for r in v.rows):
        axes.scatter([], [], marker="x", color="red", label="inf / NaN in output")
    _label(axes, names, result)
    return figure


def _finite_sqnrs(result: LayerChart) -> list[float]:
    return [r.metrics.sqnr_db for v in result.variants for r in v.rows if math.isfinite(r.metrics.sqnr_db)]


def _ceiling(result: LayerChart) -> float:
    """Where exact layers (infinite SQNR) are drawn: 10 dB above the best finite value."""
    return max(_finite_sqnrs(result), default=result.threshold_db) + 10.0


def _floor(result: LayerChart) -> float:
    """The bottom of the y axis: 0 dB, or 5 dB below the worst layer when one is below 0 dB (error
    stronger than the signal), so that no layer falls off the chart."""
    return min(0.0, min(_finite_sqnrs(result), default=0.0) - 5.0)


MAX_TICK_LABELS = 72  # beyond this every k-th layer is labelled, so labels never overlap on a 24-inch figure


def _label(axes, names: list[str], result: LayerChart) -> None:
    step = max(1, -(-len(names) // MAX_TICK_LABELS))
    axes.set_xticks(range(0, len(names), step))
    axes.set_xticklabels(names[::step], rotation=70, ha="right", fontsize=7)
    axes.set_xlabel("layer, in execution order" + (f" (one label every {step} layers)" if step > 1 else ""))
    axes.set_ylabel("SQNR against reference (dB, higher is better)")
    axes.set_title(f"Error by layer ({result.mode})")
    axes.set_ylim(bottom=_floor(result))
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
