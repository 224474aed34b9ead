"""The ``dtypelab`` command: parse, call the library, render. Nothing here computes.

CLI layer, the top of the house: one file per command, shared options in :mod:`.common`, and one
exception -> message table (``common.ERROR_MESSAGES``): every :class:`~dtypelab.errors.DtypelabError`
becomes one line on stderr and its exit code (``dtypelab.errors.EXIT_CODES``: 2 bad input, 3 refused
damage, 4 a failed variant, 5 a side output not written, 130 interrupted); ``--debug`` shows the
traceback instead, and the third-party import noise that :mod:`dtypelab.quiet` drops. Ctrl-C and SIGTERM
end in the same one line (``interrupted: nothing written to DST``) and exit code 130, after the cleanup
that the interrupted call does on its way out.
"""

from __future__ import annotations

import gc
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import click

from .. import settings
from ..quiet import drop_known_noise
from ..report import package_version
from .cast import cast_cmd
from .clean import clean_cmd
from .common import ERROR_MESSAGES, interrupted_message, reset_outputs
from .compare import compare_cmd
from .convert import convert_cmd
from .demo import demo_cmd
from .formats import formats_cmd
from .headroom import headroom_cmd
from .inspect import inspect_cmd
from .plan import plan_cmd
from .progress import clear_status_line
from .report import report_cmd
from .sensitivity import sensitivity_cmd

COMMANDS = [inspect_cmd, cast_cmd, compare_cmd, headroom_cmd, sensitivity_cmd, plan_cmd, convert_cmd,
            report_cmd, clean_cmd, formats_cmd, demo_cmd]
"""Every command, in the order ``dtypelab --help`` lists them; a new command is one more entry."""


def entry() -> None:
    """The ``dtypelab`` console script and ``python -m dtypelab.cli``: :func:`main`, then a process exit
    that skips Python's last collection of what the run left.

    Why: with torch imported, finalization's garbage collection walks every object torch made, ~0.4 s
    here (``python -c "import torch"`` exits 0.5 s after its import ends; after ``gc.freeze()``, 0.1 s),
    which every command paid after its output was complete. Frozen objects are skipped: ``atexit``
    handlers still run and files with no reference left were closed when it went; what a reference cycle
    still holds at exit is not finalized (its ``__del__`` does not run). dtypelab's own temporary files and
    folders are removed by ``with`` blocks and ``finally`` clauses before the command returns, and its worker
    pools stop through ``atexit``. Only the process's own entry point freezes: a program that calls
    :func:`main` keeps its collector as it was.
    """
    try:
        main()
    finally:
        gc.freeze()


def main(argv: list[str] | None = None) -> None:
    """Runs one command, then exits with its documented code (the console script is :func:`entry`)."""
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv
    drop_known_noise(enabled=not debug)
    reset_outputs()
    try:
        with _sigterm_interrupts(), cli.make_context("dtypelab", list(argv)) as ctx:
            cli.invoke(ctx)
    except click.exceptions.Exit as exc:  # --help, --version
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except (KeyboardInterrupt, click.exceptions.Abort):
        clear_status_line()
        if debug:
            raise
        click.echo(interrupted_message(), err=True)
        sys.exit(130)
    except tuple(ERROR_MESSAGES) as exc:
        clear_status_line()
        if debug:
            raise
        message, code = next(fmt(exc) for kind, fmt in ERROR_MESSAGES.items() if isinstance(exc, kind))
        click.echo(message, err=True)
        sys.exit(code)


@contextmanager
def _sigterm_interrupts() -> Iterator[None]:
    """SIGTERM raises KeyboardInterrupt while a command runs, so a ``kill`` gets the cleanup and the one
    line Ctrl-C gets (the previous handler comes back afterwards; only the main thread can set one)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


class _Listed(click.Group):
    """A group that lists its commands in :data:`COMMANDS` order (what to do first, first)."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(self.commands)


@click.group(cls=_Listed, context_settings={"help_option_names": ["-h", "--help"]},
             epilog="Exit codes: 0 ok, 2 bad input, 3 --strict refused, 4 a variant failed, 5 a side output "
                    "(--plot, --report) not written, 130 interrupted.")
@click.version_option(package_version(), "--version", prog_name="dtypelab", message="%(prog)s %(version)s")
@click.option("--debug", is_flag=True, help="Show tracebacks instead of one-line errors.")
def cli(debug: bool) -> None:
    """What happens to my model in precision X? Inspect, cast, compare, diagnose and convert."""
    settings.check_all()  # a bad DTYPELAB_* value: exit 2 before the command starts (--help still works)


for command in COMMANDS:
    cli.add_command(command)

__all__ = ["cli", "entry", "main"]
