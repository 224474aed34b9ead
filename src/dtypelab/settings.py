"""The environment settings dtypelab reads (``DTYPELAB_*``): one table of names, values and meanings, so
each is documented once and checked once (the CLI checks them all before a command starts: a mistyped
value is exit 2 at once, not a failure after the model has loaded).

Base layer: imports only :mod:`dtypelab.errors`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from .errors import SettingError

__all__ = ["SETTINGS", "Setting", "check_all", "value"]


@dataclass(frozen=True)
class Setting:
    """One environment variable: its accepted ``choices`` (None: any text, e.g. a path), the value it
    has when unset (``default``) and what it controls (``meaning``)."""

    name: str
    choices: tuple[str, ...] | None
    default: str | None
    meaning: str


SETTINGS: dict[str, Setting] = {s.name: s for s in (
    Setting("DTYPELAB_CACHE", None, None,
            "folder for models dtypelab builds once (the smollm2 built-in); default $XDG_CACHE_HOME/dtypelab "
            "or ~/.cache/dtypelab"),
    Setting("DTYPELAB_MSE_KERNEL", ("auto", "always", "never"), "auto",
            "the compiled :mse search of integer formats (numba, the 'fast' extra): auto loads it once a "
            "process has searched 32 M weights eagerly, always at once, never keeps the eager search; the "
            "codes are the same either way"),
)}


def value(name: str) -> str | None:
    """The setting's value from the environment (its default when unset), checked against its choices.

    Raises:
        SettingError: a value the setting does not take (the message lists the ones it does).
    """
    setting = SETTINGS[name]
    found = os.environ.get(name)
    if found is None:
        return setting.default
    if setting.choices is not None and found not in setting.choices:
        raise SettingError(f"{name}={found!r} is not a value it takes: {setting.meaning}; set one of "
                           f"{', '.join(setting.choices)}, or unset it")
    return found


def check_all() -> None:
    """:func:`value` of every setting, so a bad one stops a command before its work starts."""
    for name in SETTINGS:
        value(name)
