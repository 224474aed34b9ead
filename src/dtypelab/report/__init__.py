"""Rendering building blocks: tables as text / HTML / JSON, and charts.

The lowest stage after the base modules: every result dataclass of every stage mixes in
:class:`TableMixin`, so this package imports nothing above :mod:`dtypelab.errors`.
"""

from .plot import PLOT_SUFFIXES, LayerChart, plot_layers
from .table import Table, TableMixin, format_cell, to_jsonable

__all__ = ["PLOT_SUFFIXES", "LayerChart", "Table", "TableMixin", "format_cell", "plot_layers", "to_jsonable"]
