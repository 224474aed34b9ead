"""Qualified names: the one glob matcher every pattern option uses, and name containment.

Base layer: imports nothing of dtypelab. ``--keep``, ``--select``, ``convert --keep`` and
``quantize_model(include=, exclude=)`` all match through :func:`name_matches`, so a pattern means the
same thing in every command and on every platform (case-sensitive; ``fnmatch.fnmatch`` would fold case on
Windows).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Sequence

GLOB_CHARACTERS = frozenset("*?[")


def name_matches(name: str, pattern: str) -> bool:
    """Whether qualified ``name`` (``layers.0.mlp``) matches the glob ``pattern``, case-sensitively."""
    return fnmatch.fnmatchcase(name, pattern)


def any_matches(name: str, patterns: Iterable[str]) -> bool:
    """Whether any of ``patterns`` matches ``name`` (see :func:`name_matches`)."""
    return any(name_matches(name, p) for p in patterns)


def is_glob(text: str) -> bool:
    """Whether ``text`` holds a glob character (``*``, ``?``, ``[``)."""
    return bool(GLOB_CHARACTERS & set(text))


def is_inside(name: str, outer: str) -> bool:
    """``name`` is ``outer`` or a submodule of it; ``""`` (the model itself) holds everything."""
    return outer == "" or name == outer or name.startswith(outer + ".")


def inside_any(name: str, roots: Sequence[str]) -> bool:
    """``name`` is one of ``roots`` or inside one of them (see :func:`is_inside`)."""
    return any(is_inside(name, root) for root in roots)
