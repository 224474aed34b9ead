"""The ``dtypelab`` command: parse, call the library, render. Nothing here computes.

CLI layer, the top of the house: one file per command, shared options in :mod:`.common`, and one
exception -> message table (``common.ERROR_MESSAGES``): every :class:`~dtypelab.errors.DtypelabError`
becomes one line on stderr and its exit code (2, or 3 for refused damage); ``--debug`` shows the
traceback instead, and the third-party import noise that :mod:`dtypelab.quiet` drops.
"""

from __future__ import annotations

import sys

import click

from ..quiet import drop_known_noise
from .cast import cast_cmd
from .common import ERROR_MESSAGES
from .compare import compare_cmd
from .convert import convert_cmd
from .demo import demo_cmd
from .formats import formats_cmd
from .headroom import headroom_cmd
from .inspect import inspect_cmd


def main(argv: list[str] | None = None) -> None:
    """Console entry point."""
    argv = sys.argv[1:] if argv is None else argv
    drop_known_noise(enabled="--debug" not in argv)
    try:
        cli.main(args=argv, prog_name="dtypelab", standalone_mode=False)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except tuple(ERROR_MESSAGES) as exc:
        if "--debug" in argv:
            raise
        message, code = next(fmt(exc) for kind, fmt in ERROR_MESSAGES.items() if isinstance(exc, kind))
        click.echo(message, err=True)
        sys.exit(code)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show tracebacks instead of one-line errors.")
def cli(debug: bool) -> None:
    """What happens to my model in precision X? Inspect, cast and compare."""


for command in (inspect_cmd, cast_cmd, compare_cmd, headroom_cmd, demo_cmd, formats_cmd, convert_cmd):
    cli.add_command(command)

__all__ = ["cli", "main"]
