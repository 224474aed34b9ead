"""The quantized conversion's damage count on a second thread against the same count in line (issue 16
item 2), in process, so torch's import and the processes' start and exit (the same for both) stay out.

``convert_checkpoint`` to int4:g128 of the Llama-shaped checkpoints of ``bench_convert_quantized`` (0.89
and 1.66 GiB fp32, built there once), the two ways taking turns in each round after a warm-up round:
``threaded`` is what ``convert`` does (each chunk counted while the next is read and quantized), ``inline``
the same code with the count of every chunk done before the next is read (``ChunkQuantizer.counting``
given one chunk, its in-line path). Wall and CPU seconds per run; the ratio is per round.
"""

from __future__ import annotations

import os
import shutil
import statistics
import time
from collections.abc import Callable

from dtypelab.checkpoint import ChunkQuantizer, convert_checkpoint
from dtypelab.report import Table

from .bench_convert import spread
from .bench_convert_quantized import BENCH_DIR, make_checkpoint
from .harness import print_table

ROUNDS = 5
COLUMNS = ["GiB fp32", "method", "wall s", "CPU s", "threaded / inline wall", "threaded / inline CPU"]


def run(rounds: int = ROUNDS) -> Table:
    rows, load_before, out = [], os.getloadavg(), BENCH_DIR / "counting-out"
    for layers in (4, 8):
        src = make_checkpoint(layers)
        size = sum(p.stat().st_size for p in src.glob("*.safetensors")) / 2**30
        methods = {"threaded": _convert(src, out, ChunkQuantizer.counting),
                   "inline": _convert(src, out, lambda quantizer, chunks: _INLINE(quantizer, 1))}
        times: dict[str, list[tuple[float, float]]] = {name: [] for name in methods}
        for repeat in range(rounds + 1):
            for name, method in methods.items():
                if repeat:
                    times[name].append(method())
                else:
                    method()  # warm-up
        wall = [a[0] / b[0] for a, b in zip(times["threaded"], times["inline"], strict=True)]
        cpu = [a[1] / b[1] for a, b in zip(times["threaded"], times["inline"], strict=True)]
        for name, got in times.items():
            ratios = [spread(wall), spread(cpu)] if name == "threaded" else ["", ""]
            rows.append([round(size, 2), name, round(statistics.median(t[0] for t in got), 3),
                         round(statistics.median(t[1] for t in got), 3), *ratios])
    shutil.rmtree(out, ignore_errors=True)
    notes = [f"{rounds} rounds after a warm-up round, the two ways taking turns; in process (no import, "
             f"start or exit); load average {load_before[0]:.1f} before, {os.getloadavg()[0]:.1f} after, on "
             f"{os.cpu_count()} cores"]
    return Table("Quantized conversion: damage counted on a second thread vs in line", COLUMNS, rows, notes)


_INLINE = ChunkQuantizer.counting  # the real method, called with one chunk: its in-line path


def _convert(src, out, counting: Callable) -> Callable[[], tuple[float, float]]:
    """A run of ``convert_checkpoint`` with ``ChunkQuantizer.counting`` set to ``counting``:
    (wall s, CPU s)."""
    def method() -> tuple[float, float]:
        shutil.rmtree(out, ignore_errors=True)
        saved = ChunkQuantizer.counting
        ChunkQuantizer.counting = counting
        try:
            wall, cpu = time.perf_counter(), time.process_time()
            convert_checkpoint(src, out, "int4:g128")
            return time.perf_counter() - wall, time.process_time() - cpu
        finally:
            ChunkQuantizer.counting = saved
    return method


if __name__ == "__main__":
    print_table(run())
