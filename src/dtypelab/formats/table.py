"""``dtypelab formats``: every format's figures in one table (what torch.finfo shows, for all of them).

Formats stage: reads the registry and the spec grammar; renders with :mod:`dtypelab.report`.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..report import Table, TableMixin
from .registry import Granularity, NumberFormat, all_formats
from .spec import GRAMMAR, get_format


@dataclass(frozen=True)
class FormatRow:
    """One format's figures as ``dtypelab formats`` shows them (element figures in scale units).

    ``granularity``: what shares one scale (none, tensor, channel: a row, group); ``block``: elements per
    scale for a group format (a number), None for the others (a row's length is the model's)."""

    name: str
    bits: int
    effective_bits: float
    element: str
    scale: str
    granularity: str
    block: int | None
    max_finite: float
    smallest_normal: float
    smallest_subnormal: float
    eps: float
    inf: bool
    nan: bool
    description: str


def format_row(fmt: NumberFormat) -> FormatRow:
    """The table row of one format; scales name their dtype (``fp16``, ``e8m0``, ``e4m3+fp32``)."""
    scale = (fmt.scale_format or "") + ("+fp32" if fmt.tensor_scale else "")
    scale += "" if fmt.symmetric else "+zp"
    block = fmt.group_size if fmt.granularity == Granularity.GROUP else None
    return FormatRow(fmt.name, fmt.bits, fmt.effective_bits(), fmt.element, scale, str(fmt.granularity),
                     block, fmt.max_finite, fmt.smallest_normal, fmt.smallest_subnormal, fmt.eps,
                     fmt.has_inf, fmt.has_nan, fmt.description)


@dataclass
class FormatsReport(TableMixin):
    """Every format's figures: what torch.finfo shows for torch dtypes, the same figures for the rest."""

    formats: list[FormatRow]

    def to_table(self) -> Table:
        """One row per entry, summary lines as notes (rendered by :class:`~dtypelab.report.Table`)."""
        columns = ["name", "bits", "effective_bits", "element", "scale", "granularity", "block", "max_finite",
                   "smallest_normal", "smallest_subnormal", "eps", "inf", "nan"]  # the JSON's field names
        rows = [[getattr(row, f) for f in columns] for row in self.formats]
        notes = ["effective_bits: storage bits per element including scales and zero points (per-row "
                 "scales add scale_bits / row length more); block: elements per scale of a group format",
                 "quantized formats: max_finite .. eps are element values in units of the block scale",
                 f"spec grammar: {GRAMMAR}"]
        return Table("Number formats", columns, rows, notes, default_columns=columns[:8] + ["eps"])


def format_table(specs: list[str] | None = None) -> FormatsReport:
    """The registry (or the given specs) as a :class:`FormatsReport` for text / JSON rendering."""
    formats = [get_format(s) for s in specs] if specs else list(all_formats())
    return FormatsReport([format_row(f) for f in formats])
