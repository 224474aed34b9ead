"""Weight statistics: each floating parameter's spread, outliers, and each format's weight-only error.

Analysis stage: rounds with :func:`~dtypelab.quant.round_trip`, measures with
:func:`~dtypelab.analysis.metrics.sqnr_db`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..formats import NumberFormat, get_format
from ..quant import round_trip
from ..report import Table, TableMixin
from .metrics import sqnr_db

OUTLIER_SIGMAS = 6.0  # |w - mean| > 6 std: ~2e-9 of a Gaussian, so any share is heavy-tailedness


@dataclass(frozen=True)
class WeightStats:
    """One floating parameter: its spread and what each format's rounding does to it alone.

    ``kurtosis`` is the excess kurtosis (0 for a Gaussian); ``outlier_share`` the share of values
    farther than ``OUTLIER_SIGMAS`` standard deviations from the mean; ``sqnr_db`` maps format name
    to the SQNR of the weight rounded to that format (inf when exact).
    """

    name: str
    shape: tuple[int, ...]
    absmax: float
    std: float
    kurtosis: float
    outlier_share: float
    sqnr_db: dict[str, float]


@dataclass
class WeightReport(TableMixin):
    """The result of :func:`weight_stats`."""

    rows: list[WeightStats]
    formats: list[str]

    def to_table(self) -> Table:
        columns = ["parameter", "shape", "absmax", "std", "kurtosis", "outlier_share",
                   *[f"sqnr_db.{f}" for f in self.formats]]  # the JSON's names (sqnr_db: format -> dB)
        rows = [[w.name, list(w.shape), w.absmax, w.std, w.kurtosis, w.outlier_share,
                 *[w.sqnr_db[f] for f in self.formats]] for w in self.rows]
        notes = ["kurtosis is nan for a constant tensor (std 0, e.g. a freshly initialised norm weight)"
                 ] if any(math.isnan(w.kurtosis) for w in self.rows) else []
        return Table("Weight statistics and weight-only rounding error", columns, rows, notes,
                     default_columns=["parameter", "absmax", "kurtosis", *columns[6:9]])  # 3 formats


def weight_stats(model: nn.Module, formats: Sequence[str | NumberFormat]) -> WeightReport:
    """Absmax, std, kurtosis, outlier share and per-format weight-only SQNR of every floating parameter
    (tied parameters once, under their first name)."""
    fmts = [get_format(f) for f in formats]
    rows = [_weight_row(name, p.detach(), fmts) for name, p in model.named_parameters()
            if p.is_floating_point()]
    return WeightReport(rows, [f.name for f in fmts])


def _weight_row(name: str, weight: torch.Tensor, fmts: list[NumberFormat]) -> WeightStats:
    values = weight.double().flatten()
    mean, std = values.mean(), values.std(unbiased=False)
    centred = values - mean
    kurtosis = (centred.pow(4).mean() / std.pow(4)).item() - 3 if std > 0 else math.nan
    outliers = (centred.abs() > OUTLIER_SIGMAS * std).double().mean().item() if std > 0 else 0.0
    return WeightStats(name, tuple(weight.shape), values.abs().max().item(), std.item(), kurtosis, outliers,
                       {f.name: sqnr_db(weight, round_trip(weight, f)) for f in fmts})
