"""The progress seam: how long library calls say how far they are, and how a caller stops them.

Base layer: imports only :mod:`dtypelab.errors`. The library never prints; a long call (loading,
building variants, ``compare``, ``compare_layers``, ``predict_headroom``, ``convert_checkpoint``) takes
``progress=``, a callable that receives a :class:`ProgressEvent` now and then. The CLI renders the events
on stderr; a notebook may draw a bar. Returning ``False`` from the callback asks the call to stop: it
cleans up (no half-written output) and raises :class:`~dtypelab.errors.Cancelled`.

Example:
    >>> def show(event):
    ...     print(event.stage, event.done, event.total, event.unit)
    >>> dtypelab.compare_models(model, variants, inputs, progress=show)  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from .errors import Cancelled


@dataclass(frozen=True)
class ProgressEvent:
    """How far one stage of a call is.

    Args:
        stage: what is running: ``"load"``, ``"variants"``, ``"compare"``, ``"layers"``, ``"headroom"``,
            ``"convert"``.
        done: units finished so far.
        total: units in all (None when unknown).
        unit: what is counted: ``"bytes"``, ``"variants"``, ``"modules"``, ``"steps"``.
        detail: the item at hand (a variant's name, a module's name), for display.
    """

    stage: str
    done: int
    total: int | None
    unit: str
    detail: str = ""

    @property
    def finished(self) -> bool:
        """Whether this is the stage's last event."""
        return self.total is not None and self.done >= self.total


ProgressCallback = Callable[[ProgressEvent], "bool | None"]
"""``progress(event)``; return ``False`` to cancel the call (anything else lets it go on)."""


class Progress:
    """The library's side of the seam: one stage of one call, reporting to an optional callback.

    Args:
        callback: the caller's :data:`ProgressCallback`, or None (then reporting costs nothing).
        stage, unit, total: as in :class:`ProgressEvent`.
    """

    def __init__(self, callback: ProgressCallback | None, stage: str, unit: str,
                 total: int | None = None) -> None:
        self.callback, self.stage, self.unit, self.total = callback, stage, unit, total
        self.done = 0

    def update(self, done: int, detail: str = "") -> None:
        """Report ``done`` units finished.

        Raises:
            Cancelled: the callback returned False.
        """
        self.done = done
        if self.callback is None:
            return
        if self.callback(ProgressEvent(self.stage, done, self.total, self.unit, detail)) is False:
            raise Cancelled(f"{self.stage} cancelled by its progress callback after {done:,} "
                            f"{self.unit}")

    def advance(self, count: int = 1, detail: str = "") -> None:
        """Report ``count`` more units finished."""
        self.update(self.done + count, detail)


def stage(callback: ProgressCallback | None, name: str, unit: str, total: int | None = None) -> Progress:
    """A :class:`Progress` for one stage, with its opening event (``done=0``) already sent."""
    progress = Progress(callback, name, unit, total)
    progress.update(0)
    return progress
