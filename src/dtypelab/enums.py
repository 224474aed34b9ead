"""String enums: kinds that cross modules are members, not bare strings.

Base layer: imports nothing of dtypelab. A member *is* its string (``Granularity.GROUP == "group"``), so
JSON output, ``==`` against older code and ``f"{member}"`` all give the plain value.
"""

from __future__ import annotations

from enum import Enum


class StrEnum(str, Enum):
    """``enum.StrEnum`` (Python 3.11) for 3.10 too: ``str(member)`` and formatting give the value."""

    def __str__(self) -> str:
        return str.__str__(self)

    def __format__(self, spec: str) -> str:
        return str.__format__(str.__str__(self), spec)
