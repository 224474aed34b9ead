"""Shared timing helpers. These VMs hand freed memory back to the host, so first touches are slow:
every measurement warms up first and reports the median of several runs."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

from dtypelab.report import Table


def median_seconds(fn: Callable[[], object], repeat: int = 7, warmup: int = 2) -> float:
    """Median wall time of ``fn()`` in seconds after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def print_table(table: Table) -> None:
    print(table.to_text(), end="\n\n", flush=True)


def take_turns(methods: dict[str, Callable[[], object]], rounds: int) -> dict[str, list[float]]:
    """Seconds of each method per round, methods taking turns within a round (so a load change hits all of
    them alike), after one untimed warm-up round."""
    seconds: dict[str, list[float]] = {name: [] for name in methods}
    for round_index in range(rounds + 1):
        for name, method in methods.items():
            start = time.perf_counter()
            method()
            if round_index:
                seconds[name].append(time.perf_counter() - start)
    return seconds
