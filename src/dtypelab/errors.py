"""One exception family for everything a user can get wrong.

Base layer: imports nothing of dtypelab. The CLI maps every ``DtypelabError`` to one line on stderr and
exit code 2 (``--debug`` shows the traceback). Messages say what is wrong, why, and how to fix it, in one
sentence each.
"""

from __future__ import annotations


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
