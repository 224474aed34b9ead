"""One cell's text: the number formatting every table, note and chart label shares.

Report layer, its bottom: imports nothing of dtypelab, so both :mod:`~dtypelab.report.table` and
:mod:`~dtypelab.report.html` build on it.
"""

from __future__ import annotations

import math
from typing import Any


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
