"""Forward latency, timed fairly: models take turns, medians after warm-up.

Analysis stage: builds on :func:`dtypelab.analysis.run.run_model`.
"""

from __future__ import annotations

import statistics
import time

import torch
from torch import nn

from .run import run_model


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
            _synchronize()  # the previous model's queued GPU work must not count against this one
            start = time.perf_counter()
            run_model(model, inputs)
            _synchronize()
            series.append((time.perf_counter() - start) * 1000)
    return [statistics.median(series) for series in times]


def _synchronize() -> None:
    """Wait for queued CUDA kernels (forwards return before a GPU has finished); nothing on CPU."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
