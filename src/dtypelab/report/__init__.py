"""Rendering building blocks: tables as text / HTML / JSON, and charts.

The lowest stage after the base modules: every result dataclass of every stage mixes in
:class:`TableMixin`, so this package imports nothing above :mod:`dtypelab.errors`.
"""

from .html import HTML_VIEWS, render_document, render_fragment, run_facts, write_html
from .plot import PLOT_SUFFIXES, LayerChart, ParetoPoint, plot_layers, plot_pareto
from .schema import json_schema, load_schema
from .table import (
    ALL_COLUMNS,
    COMPOSITE_KINDS,
    JSON_KINDS,
    TEXT_WIDTH,
    Styler,
    Table,
    TableMixin,
    check_columns,
    composite_document,
    format_cell,
    is_all_columns,
    json_document,
    package_version,
    schema_id,
    tables_text,
    to_jsonable,
)

__all__ = ["ALL_COLUMNS", "TEXT_WIDTH", "Styler", "check_columns", "is_all_columns", "tables_text",
           "COMPOSITE_KINDS", "JSON_KINDS", "PLOT_SUFFIXES", "LayerChart", "Table", "TableMixin",
           "composite_document", "format_cell", "json_document", "json_schema", "load_schema",
           "ParetoPoint", "plot_pareto",
           "package_version", "plot_layers", "schema_id", "to_jsonable",
           "HTML_VIEWS", "render_document", "render_fragment", "run_facts", "write_html"]
