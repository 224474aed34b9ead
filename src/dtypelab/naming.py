"""Qualified names: the one glob matcher every pattern option uses, and name containment.

Base layer: imports nothing of dtypelab. ``--keep``, ``--select``, ``convert --keep`` and
``quantize_model(include=, exclude=)`` all match through :func:`name_matches`, so a pattern means the
same thing in every command and on every platform (case-sensitive; ``fnmatch.fnmatch`` would fold case on
Windows).
"""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Iterable, Sequence

GLOB_CHARACTERS = frozenset("*?[")


def name_matches(name: str, pattern: str) -> bool:
    """Whether qualified ``name`` (``layers.0.mlp``) is ``pattern`` or matches it as a glob,
    case-sensitively. The exact name wins first, so a ModuleDict key such as ``experts[0]`` is found as
    itself rather than read as a character class."""
    return name == pattern or fnmatch.fnmatchcase(name, pattern)


def tensor_matches(tensor: str, pattern: str) -> bool:
    """Whether a tensor (``layers.0.norm.weight``) is named by ``pattern``: the tensor itself, or any
    module holding it (``layers.0.norm``, ``*.norm``) — so ``--keep`` takes module names in ``convert``
    as in ``compare``."""
    parts = tensor.split(".")
    return any(name_matches(".".join(parts[:i]), pattern) for i in range(len(parts), 0, -1))


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


def closest_names(pattern: str, names: Iterable[str], count: int = 3) -> list[str]:
    """The names (or, for a glob, the name parts as ``*part*`` globs) closest to a pattern that matched
    nothing, best first, for a "did you mean": ``input_layernrom`` -> ``model.layers.0.input_layernorm``,
    ``*nrom*`` -> ``*norm*``. Empty when nothing is close (difflib's ratio below 0.6)."""
    names = list(dict.fromkeys(names))
    core = pattern.strip("*?") if is_glob(pattern) else pattern
    if not core:
        return []
    close = [] if is_glob(pattern) else difflib.get_close_matches(core, names, n=count, cutoff=0.6)
    if close:
        return close
    parts = list(dict.fromkeys(part for name in names for part in name.split(".")))
    close = difflib.get_close_matches(core.strip("."), parts, n=count, cutoff=0.6)
    if is_glob(pattern):
        return [f"*{part}*" for part in close]
    return [next(n for n in names if part in n.split(".")) for part in close]  # a part: its first name


def did_you_mean_names(pattern: str, names: Iterable[str]) -> str:
    """`` (did you mean 'a', 'b'?)`` with :func:`closest_names`, else ``""``."""
    close = closest_names(pattern, names)
    return f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""
