"""The quantized conversion's second thread (damage count, read ahead) against the same work in line,
and both against the in-memory script (issue 16 item 2), in process, so torch's import and the processes'
start and exit (the same for all) stay out.

To int4:g128, the Llama-shaped checkpoints of ``bench_convert_quantized`` (0.89 and 1.66 GiB fp32, built
there once), the methods taking turns in each round after a warm-up round: ``threaded`` is what
``convert_checkpoint`` does (each chunk counted, and the next read, on the second thread while this one is
quantized); ``inline`` the same code with every chunk's count and read done in line
(``ChunkQuantizer.counting`` given one chunk, its in-line path); ``script`` the in-memory script of
``bench_convert_quantized`` (``load_file`` -> ``quantize_tensor`` + ``to_parts`` -> ``save_file``, no
damage count) at torch's default threads, and ``script + count`` the same with ``quantize_counted`` (what
one writes to get convert's damage report too). ``no count`` is a diagnostic, not a product path: the
threaded conversion with each chunk's count replaced by an empty record, to show what the count itself
costs (the bound on how close to the script the conversion can come while it counts). Wall and CPU seconds
per run; ratios are per round.
"""

from __future__ import annotations

import functools
import os
import shutil
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

from dtypelab.checkpoint import ChunkQuantizer, convert_checkpoint, streaming
from dtypelab.quant import Action, TensorDamage
from dtypelab.report import Table

from .bench_convert import spread
from .bench_convert_quantized import BENCH_DIR, COUNTED_SCRIPT, IN_MEMORY_SCRIPT, make_checkpoint
from .harness import print_table

ROUNDS = 5
BASES = ("inline", "script", "script + count")
COLUMNS = ["GiB fp32", "method", "wall s", "CPU s",
           *(f"/ {base} {what}" for base in BASES for what in ("wall", "CPU"))]


def run(rounds: int = ROUNDS) -> Table:
    rows, load_before, out = [], os.getloadavg(), BENCH_DIR / "counting-out"
    for layers in (4, 8):
        src = make_checkpoint(layers)
        size = sum(p.stat().st_size for p in src.glob("*.safetensors")) / 2**30
        methods = {"threaded": _timed(_convert(src, out, ChunkQuantizer.counting)),
                   "inline": _timed(_convert(src, out, lambda quantizer, chunks: _INLINE(quantizer, 1))),
                   "script": _timed(functools.partial(_script, src, out, IN_MEMORY_SCRIPT)),
                   "script + count": _timed(functools.partial(_script, src, out, COUNTED_SCRIPT)),
                   "no count (diagnostic)": _timed(_uncounted(_convert(src, out, ChunkQuantizer.counting)))}
        times: dict[str, list[tuple[float, float]]] = {name: [] for name in methods}
        for repeat in range(rounds + 1):
            for name, method in methods.items():
                if repeat:
                    times[name].append(method())
                else:
                    method()  # warm-up
        for name, got in times.items():
            ratios = [ratio for base in BASES for ratio in _ratios(got, times[base])]
            rows.append([round(size, 2), name, round(statistics.median(t[0] for t in got), 3),
                         round(statistics.median(t[1] for t in got), 3), *ratios])
    shutil.rmtree(out, ignore_errors=True)
    notes = [f"{rounds} rounds after a warm-up round, the methods taking turns; in process (no import, "
             f"start or exit); load average {load_before[0]:.1f} before, {os.getloadavg()[0]:.1f} after, on "
             f"{os.cpu_count()} cores"]
    return Table("Quantized conversion: damage counted on a second thread vs in line", COLUMNS, rows, notes)


_INLINE = ChunkQuantizer.counting  # the real method, called with one chunk: its in-line path


def _ratios(got: list[tuple[float, float]], base: list[tuple[float, float]]) -> list[str]:
    """[wall, CPU] ratios per round of ``got`` over ``base``, as ``median (min-max)``."""
    return [spread([a[i] / b[i] for a, b in zip(got, base, strict=True)]) for i in (0, 1)]


def _timed(method: Callable[[], object]) -> Callable[[], tuple[float, float]]:
    """``method`` run once: (wall s, CPU s of this process)."""
    def run_once() -> tuple[float, float]:
        wall, cpu = time.perf_counter(), time.process_time()
        method()
        return time.perf_counter() - wall, time.process_time() - cpu
    return run_once


def _convert(src: Path, out: Path, counting: Callable) -> Callable[[], None]:
    """``convert_checkpoint`` to int4:g128 with ``ChunkQuantizer.counting`` set to ``counting``."""
    def method() -> None:
        shutil.rmtree(out, ignore_errors=True)
        saved = ChunkQuantizer.counting
        ChunkQuantizer.counting = counting
        try:
            convert_checkpoint(src, out, "int4:g128")
        finally:
            ChunkQuantizer.counting = saved
    return method


def _uncounted(method: Callable[[], None]) -> Callable[[], None]:
    """``method`` with the quantized conversion's damage count replaced by an empty record (diagnostic)."""
    def empty(back, workspace) -> TensorDamage:
        return TensorDamage("", "", "", Action.QUANTIZED, back.source.numel())

    def run_uncounted() -> None:
        real = streaming.read_back_damage
        streaming.read_back_damage = empty
        try:
            method()
        finally:
            streaming.read_back_damage = real
    return run_uncounted


def _script(src: Path, out: Path, text: str) -> None:
    """One of ``bench_convert_quantized``'s in-memory scripts, its own text run in this process (its
    arguments in ``sys.argv``, as there)."""
    shutil.rmtree(out, ignore_errors=True)
    saved = sys.argv
    sys.argv = ["script", str(src), str(out), "int4:g128"]
    try:
        exec(compile(text, "in-memory script", "exec"), {"__name__": "script"})
    finally:
        sys.argv = saved


if __name__ == "__main__":
    print_table(run())
