"""The progress display: one stderr line, redrawn, saying which stage of a long command is how far.

CLI layer: renders the library's :class:`~dtypelab.progress.ProgressEvent` values (loading, building
variants, forwards, ``--layers``, ``headroom``) so a run of minutes is never silent. Only on a terminal
(piped or redirected stderr gets nothing, as do ``--quiet`` and ``NO_PROGRESS``), at most 5 redraws a
second, cut to the terminal's width; the line is cleared when the command ends, so the result and any
error start on a clean line.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from typing import TextIO

import click

from ..progress import ProgressEvent

REDRAW_SECONDS = 0.2


class StatusLine:
    """``compare 2/4 variants int8  12 s`` on one redrawn stderr line."""

    def __init__(self, stream: TextIO | None = None, width: int | None = None) -> None:
        self.stream = stream or sys.stderr
        self.width = width or shutil.get_terminal_size((100, 24)).columns
        self.start = time.monotonic()
        self.shown = -REDRAW_SECONDS
        self.open_line = False
        self.stage = ""

    def __call__(self, event: ProgressEvent) -> None:
        """Draw ``event`` unless the line was redrawn under ``REDRAW_SECONDS`` ago — a new stage and a
        stage's last event are always drawn, so every stage shows even on a fast run."""
        now = time.monotonic()
        if now - self.shown < REDRAW_SECONDS and not event.finished and event.stage == self.stage:
            return
        self.shown, self.stage = now, event.stage
        self._draw(describe(event, now - self.start))

    def _draw(self, text: str) -> None:
        text = text[: self.width - 1]
        click.echo("\r" + text.ljust(self.width - 1), file=self.stream, nl=False)
        self.open_line = True

    def close(self) -> None:
        """Clear the line (the result prints on a clean terminal)."""
        if self.open_line:
            click.echo("\r" + " " * (self.width - 1) + "\r", file=self.stream, nl=False)
            self.open_line = False


def describe(event: ProgressEvent, seconds: float) -> str:
    """One event in words: stage, count (of total), unit, the item at hand, time so far."""
    if event.unit == "bytes":
        count = f"{event.done / 1e9:.2f}" + (f"/{event.total / 1e9:.2f}" if event.total else "") + " GB"
    else:
        count = f"{event.done:,}" + (f"/{event.total:,}" if event.total else "") + f" {event.unit}"
    detail = f"  {event.detail}" if event.detail else ""
    return f"{event.stage}: {count}{detail}  {seconds:.0f} s"


_ACTIVE: list[StatusLine] = []
"""The status line of the running command: cleared before its result or an error is printed."""


def status_line(quiet: bool) -> StatusLine | None:
    """A :class:`StatusLine` when stderr is a terminal and nobody asked for silence, else None."""
    if quiet or os.environ.get("NO_PROGRESS") or not sys.stderr.isatty():
        return None
    _ACTIVE.append(StatusLine())
    return _ACTIVE[-1]


def clear_status_line() -> None:
    """Clear the running command's status line, if any: called before anything else is printed."""
    while _ACTIVE:
        _ACTIVE.pop().close()


def quiet_option(f):
    return click.option("--quiet", is_flag=True,
                        help="No progress line on stderr (there is none when stderr is not a terminal).")(f)
