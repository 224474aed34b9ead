"""One exception family for everything a user can get wrong.

Base layer: imports nothing of dtypelab. The CLI maps every ``DtypelabError`` to one line on stderr and
its ``exit_code`` (2 for bad input; :data:`EXIT_CODES` lists them all); ``--debug`` shows the
traceback. Messages say what is wrong, why, and how to fix it, in one sentence each.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class DtypelabError(Exception):
    """Base class: a problem with the user's input, not a bug in dtypelab."""

    exit_code = 2


class UnknownFormatError(DtypelabError, ValueError):
    """A dtype or format name that the registry does not know."""


class InputError(DtypelabError, ValueError):
    """Model inputs that cannot be parsed or do not fit the model."""


class ModelSpecError(DtypelabError, ValueError):
    """A model name, path or factory that cannot be resolved."""


class NotRunnableError(ModelSpecError):
    """Weights without the config that says how to run them: inspectable, not runnable."""


class CheckpointError(DtypelabError):
    """A checkpoint file that is missing, corrupt or unsafe to read or write."""


class SettingError(DtypelabError, ValueError):
    """A ``DTYPELAB_*`` environment variable whose value dtypelab does not take (see ``settings``)."""


class DamageError(DtypelabError):
    """A conversion refused under ``--strict`` because values would be lost (exit code 3)."""

    exit_code = 3


class Cancelled(DtypelabError):
    """A long call stopped because its progress callback asked it to (see :mod:`dtypelab.progress`).

    Raised after the call's own cleanup: nothing half-written is left behind (exit code 130, as for
    Ctrl-C)."""

    exit_code = 130


def first_line(exc: BaseException) -> str:
    """A third-party error's first line for a one-line message (its type name when it has no text)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class VariantFailed(DtypelabError):
    """Some variants of a run failed: the result (with each failed row's reason) was printed, then this
    names them (exit code 4), so a script can tell a run where every row is ``ok`` from one that is not."""

    exit_code = 4


class SideOutputError(DtypelabError):
    """The main work is done and its result printed, but a side output (``--plot``, ``--report``) could
    not be written (exit code 5): the message names it, so a finished result is never mistaken for a
    failed run."""

    exit_code = 5


EXIT_CODES: dict[int, str] = {
    0: "ok: every variant ran, every output was written",
    1: "a bug in dtypelab (a traceback; please report it)",
    2: "bad input: nothing ran (a typo in a name, a spec, a path, or an option its mode ignores)",
    3: "refused: --strict found values that would be lost; nothing written",
    4: "some variant failed: the result was printed, each failed row with its reason",
    5: "the result was printed, but a side output (--plot, --report) could not be written",
    130: "interrupted (Ctrl-C or SIGTERM): nothing half-written is left",
}
"""Every exit code of the ``dtypelab`` command and what it means (the README's table)."""


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """`` (did you mean 'int8'?)`` for the closest of ``choices`` to a mistyped ``name``, else ``""``:
    appended to an "unknown X" message, so a typo is fixed without reading the whole list."""
    by_lower = {choice.lower(): choice for choice in choices}
    close = difflib.get_close_matches(name.lower(), list(by_lower), n=1, cutoff=0.6)
    return f" (did you mean {by_lower[close[0]]!r}?)" if close else ""
