"""torch on first use: a module stand-in that imports the real module when an attribute is asked for.

Base layer: imports nothing of dtypelab. The formats registry, the help of every command and
``dtypelab formats`` need no tensor, and torch's import is ~90% of a bare CLI start-up (1.5-2.5 s here
against Python's 0.02 s), so the modules they reach bind ``torch = lazy_module("torch")`` instead of
``import torch``: the first ``torch.tensor(...)`` (or any attribute) imports torch, later uses go
straight to it. Nothing is put in ``sys.modules`` until the real import, so ``"torch" in sys.modules``
still tells whether torch was imported (tests/cli/test_startup.py relies on it).
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from types import ModuleType
from typing import Any


class LazyModule:
    """Stands for the module ``name``; every attribute access is the real module's (imported once)."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._module: ModuleType | None = None

    def __getattr__(self, attribute: str) -> Any:
        if attribute.startswith("__") and attribute.endswith("__"):  # copy, pickle, inspect probe these
            raise AttributeError(attribute)
        if self._module is None:
            self._module = importlib.import_module(self._name)
        return getattr(self._module, attribute)

    def __repr__(self) -> str:
        state = "imported" if self._module is not None else "not imported yet"
        return f"<lazy module {self._name!r} ({state})>"


def lazy_module(name: str) -> LazyModule:
    """A stand-in for ``import name`` that imports it on the first attribute access."""
    return LazyModule(name)


def lazy_exports(package: str,
                 exports: dict[str, str]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """A stage package's ``__getattr__`` and ``__dir__`` (PEP 562): each public name, imported from its
    submodule (``exports``: name -> submodule) the first time it is asked for, then bound in the package.

    ``import dtypelab.models`` then costs nothing until ``models.load`` (say) is used, so the CLI can
    import every stage at the top of its files and still start without torch for ``--help``. Library
    modules keep importing names from stages (``from ..quant import cast_model``) as before: a
    from-import asks the package, which imports the submodule.
    """

    def __getattr__(name: str) -> Any:
        submodule = exports.get(name)
        if submodule is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f"{package}.{submodule}"), name)
        setattr(sys.modules[package], name, value)
        return value

    def __dir__() -> list[str]:
        return sorted(set(vars(sys.modules[package])) | set(exports))

    return __getattr__, __dir__
