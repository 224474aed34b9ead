"""Forward latency, timed fairly: models take turns, medians after warm-up.

Analysis stage: builds on :func:`dtypelab.analysis.run.run_model`.

Why turns: on a shared machine load comes and goes; two forwards run back to back see the same load, so
the ratio of their times is steadier than the ratio of two medians taken minutes apart. Why the order
flips every round: the second of two runs of similar models tends to differ a little (caches, the
allocator), which would otherwise always favour the same side.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import InputError
from .run import run_model

SLOWER_MARGIN = 0.10
"""How far above parity (as a fraction) a ratio must be before "slower" may be said at all."""


@dataclass(frozen=True)
class TakenInTurns:
    """Per-round forward times (milliseconds) of a reference and a candidate timed in alternation.

    ``reference_ms[i]`` and ``candidate_ms[i]`` were taken back to back in round ``i`` (the reference
    first in even rounds, the candidate first in odd ones), so ``ratios[i]`` saw one machine load.
    """

    reference_ms: tuple[float, ...]
    candidate_ms: tuple[float, ...]

    @property
    def ratios(self) -> list[float]:
        """Candidate time over reference time, one per round (dimensionless)."""
        return [c / r if r > 0 else float("inf")
                for r, c in zip(self.reference_ms, self.candidate_ms, strict=True)]

    @property
    def ratio_quartiles(self) -> tuple[float, float]:
        """Lower and upper quartile of :attr:`ratios`: the round-to-round noise of the ratio."""
        return ratio_quartiles(self.ratios)


def take_turns(reference: nn.Module, candidate: nn.Module, inputs, warmup: int = 1, rounds: int = 7,
               min_seconds: float = 0.25, max_rounds: int = 200) -> TakenInTurns:
    """Time ``reference`` and ``candidate`` alternately: ``warmup`` untimed rounds, then timed rounds.

    At least ``rounds`` timed rounds are run, and more (up to ``max_rounds``) until ``min_seconds`` of
    forwards have been timed: a forward of a fraction of a millisecond is mostly scheduler noise and many
    rounds of it cost little, while a model that takes a second per forward stops at ``rounds``.

    Raises:
        InputError: ``rounds`` below 2 (one round has no spread), ``max_rounds`` below ``rounds``, or a
            negative ``warmup`` / ``min_seconds``.
    """
    if rounds < 2 or max_rounds < rounds or warmup < 0 or min_seconds < 0:
        raise InputError(f"take_turns needs 2 <= rounds <= max_rounds, warmup >= 0 and min_seconds >= 0; "
                         f"got rounds={rounds}, max_rounds={max_rounds}, warmup={warmup}, "
                         f"min_seconds={min_seconds}")
    for _ in range(warmup):
        run_model(reference, inputs)
        run_model(candidate, inputs)
    ref_ms: list[float] = []
    cand_ms: list[float] = []
    budget_ms = 1000 * min_seconds
    while len(ref_ms) < max_rounds and (len(ref_ms) < rounds or sum(ref_ms) + sum(cand_ms) < budget_ms):
        order = ((reference, ref_ms), (candidate, cand_ms))
        for model, series in order if len(ref_ms) % 2 == 0 else order[::-1]:
            series.append(_time_one(model, inputs))
    return TakenInTurns(tuple(ref_ms), tuple(cand_ms))


def is_clearly_slower(ratio: float, low_quartile: float, margin: float = SLOWER_MARGIN) -> bool:
    """Whether a candidate is slower than its reference beyond the noise that was measured.

    ``ratio`` is the candidate's median over the reference's (same rounds); ``low_quartile`` the lower
    quartile of the per-round ratios (:attr:`TakenInTurns.ratio_quartiles`). Slower means both exceed
    ``1 + margin``: the candidate took over ``1 + margin`` times the reference run beside it in at least
    three rounds of four, and its median did too. Noise on a busy machine only ever adds time (a preempted
    or throttled forward): a round whose reference stalled reads too small, one whose candidate stalled
    too large. The lower quartile lets a clearly slower candidate lose a quarter of its rounds to stalls,
    while identical models, slower and faster by turns, stay above the margin in three rounds of four only
    by a rare run of luck (never in 300 tries of a 0.07 ms model on a busy 2-core machine).
    """
    return ratio > 1 + margin and low_quartile > 1 + margin


def ratio_quartiles(ratios: list[float]) -> tuple[float, float]:
    """First and third quartile of per-round ratios (inclusive method: both lie within the data).

    Raises:
        InputError: fewer than two ratios.
    """
    if len(ratios) < 2:
        raise InputError(f"a spread needs at least two rounds, got {len(ratios)}")
    low, _, high = statistics.quantiles(ratios, n=4, method="inclusive")
    return low, high


def forward_latency_ms(model: nn.Module, inputs, warmup: int = 2, runs: int = 7) -> float:
    """Median wall time of one forward pass in milliseconds, after ``warmup`` untimed passes."""
    return paired_latency_ms([model], inputs, warmup, runs)[0]


def paired_latency_ms(models: list[nn.Module], inputs, warmup: int = 2, runs: int = 7) -> list[float]:
    """Median forward milliseconds of each model, timed in alternation (round-robin) after warm-up.

    Alternating makes a busy machine slow every model alike, so ratios between them stay meaningful.
    """
    for _ in range(warmup):
        for model in models:
            run_model(model, inputs)
    times: list[list[float]] = [[] for _ in models]
    for _ in range(runs):
        for model, series in zip(models, times, strict=True):
            series.append(_time_one(model, inputs))
    return [statistics.median(series) for series in times]


def _time_one(model: nn.Module, inputs) -> float:
    """One forward's wall time in milliseconds: its own GPU work included, work queued before it not."""
    _synchronize()  # the previous model's queued GPU work must not count against this one
    start = time.perf_counter()
    run_model(model, inputs)
    _synchronize()
    return (time.perf_counter() - start) * 1000


def _synchronize() -> None:
    """Wait for queued CUDA kernels (forwards return before a GPU has finished); nothing on CPU."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
