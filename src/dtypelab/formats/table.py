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
    """One format's figures as ``dtypelab formats`` shows them (element figures in scale units)."""

    name: str
    bits: int
    effective_bits: float
    element: str
    scale: str
    block: str
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
    return FormatRow(fmt.name, fmt.bits, fmt.effective_bits(), fmt.element, scale, _block_label(fmt),
                     fmt.max_finite, fmt.smallest_normal, fmt.smallest_subnormal, fmt.eps,
                     fmt.has_inf, fmt.has_nan, fmt.description)


def _block_label(fmt: NumberFormat) -> str:
    if fmt.granularity == Granularity.GROUP:
        return f"{fmt.group_size}"
    return {"none": "", "channel": "row", "tensor": "tensor"}[fmt.granularity]


@dataclass
class FormatsReport(TableMixin):
    """Every format's figures: what torch.finfo shows for torch dtypes, the same figures for the rest."""

    formats: list[FormatRow]

    def to_table(self) -> Table:
        """One row per entry, summary lines as notes (rendered by :class:`~dtypelab.report.Table`)."""
        columns = ["name", "bits", "eff_bits", "element", "scale", "block", "max_finite", "smallest_normal",
                   "smallest_subnormal", "eps", "inf", "nan"]
        fields = [c.replace("eff_bits", "effective_bits") for c in columns]
        rows = [[getattr(row, f) for f in fields] for row in self.formats]
        notes = ["eff_bits: storage bits per element including scales and zero points (per-row scales "
                 "add scale_bits / row length more)",
                 "quantized formats: max_finite .. eps are element values in units of the block scale",
                 f"spec grammar: {GRAMMAR}"]
        return Table("Number formats", columns, rows, notes, default_columns=columns[:8] + ["eps"])


def format_table(specs: list[str] | None = None) -> FormatsReport:
    """The registry (or the given specs) as a :class:`FormatsReport` for text / JSON rendering."""
    formats = [get_format(s) for s in specs] if specs else list(all_formats())
    return FormatsReport([format_row(f) for f in formats])
