"""Number formats: element codecs, the registry, the spec grammar and the formats table.

The first stage above the base modules and :mod:`dtypelab.report`; it needs no tensor data, only
torch's dtypes. Adding a format is adding a registry entry (``registry._REGISTRY``).
"""

from .codecs import FloatCodec, IntCodec, TableCodec, rounding_threshold
from .registry import (
    E2M1,
    E4M3,
    E5M2,
    E8M0,
    INT4,
    INT8,
    NF4,
    SCALE_DTYPES,
    UINT4,
    UINT8,
    Granularity,
    NumberFormat,
    all_formats,
    base_format,
)
from .spec import GRAMMAR, canonical_name, get_format, parse_format_list, split_list
from .table import FormatRow, FormatsReport, format_row, format_table

__all__ = [
    "E2M1", "E4M3", "E5M2", "E8M0", "GRAMMAR", "INT4", "INT8", "NF4", "SCALE_DTYPES", "UINT4", "UINT8",
    "FloatCodec", "FormatRow", "FormatsReport", "Granularity", "IntCodec", "NumberFormat", "TableCodec",
    "all_formats", "base_format", "canonical_name", "format_row", "format_table", "get_format",
    "parse_format_list", "rounding_threshold", "split_list",
]
