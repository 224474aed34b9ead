"""The ``:mse`` clip search (issue 16 item 3) on minilm's Linear weights, beside optimum-quanto's qint4.

Each round quantizes every Linear weight of minilm (37 matrices, 10.8 M weights) once per method, the
methods taking turns: dtypelab ``int4:g128:mse`` with the compiled search (``mse_kernel``, numba, loaded
before timing: its one-time cost is measured apart, in a fresh process), the same with the eager stacked
search (``DTYPELAB_MSE_KERNEL=never``), the search one ratio at a time (the loop the stacked one
replaced, run through the module's own one-by-one path, so it shares every other step), dtypelab
``int4:g128`` (absmax, no search), and quanto ``qint4`` (group 128, scale + shift: ``MaxOptimizer`` then
``quantize_weight``, what ``quantize(model, weights=qint4); freeze(model)`` does per weight). A ratio is
a method's seconds over quanto's in the same round; the table gives the median over rounds and its
min-max, with the load average before and after (the machine is shared). Before timing, the compiled and
the eager searches' stored bits are compared on every weight: the goal asks for identical codes.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
from collections.abc import Callable

import torch
from optimum.quanto import qint4
from optimum.quanto.tensor import quantize_weight
from optimum.quanto.tensor.optimizers import MaxOptimizer

from dtypelab.formats import get_format
from dtypelab.models import load
from dtypelab.quant import qtensor
from dtypelab.quant.qtensor import quantize_tensor
from dtypelab.report import Table

from .harness import print_table, take_turns

ROUNDS = 5
THREADS = (1, 2)  # 2 threads on 2 shared cores also measure OpenMP waiting for a busy core
COMPILED = "dtypelab int4:g128:mse (compiled)"
STACKED = "dtypelab int4:g128:mse (eager, stacked)"
MODE = qtensor.mse_kernel.MODE_VARIABLE  # DTYPELAB_MSE_KERNEL
LOAD_PROBE = """
import time, torch
from dtypelab.formats import get_format
from dtypelab.quant.qtensor import quantize_tensor
w = torch.randn(64, 256)
start = time.perf_counter()
quantize_tensor(w, get_format("int4:g128:mse"))
print(time.perf_counter() - start)
"""
COLUMNS = ["threads", "method", "median_s", "x quanto", "x quanto min-max", "x plain", "x plain min-max"]


def run(rounds: int = ROUNDS, threads: tuple[int, ...] = THREADS) -> Table:
    weights = minilm_linear_weights()
    same = _same_codes(weights, "int4:g128:mse")
    load_s = [_first_search_seconds(mode) for mode in ("always", "never", "always", "never")]
    methods = {COMPILED: _with_mode("always", _ours(weights, "int4:g128:mse")),
               STACKED: _with_mode("never", _ours(weights, "int4:g128:mse")),
               "dtypelab int4:g128:mse (one ratio at a time)": _one_by_one(weights, "int4:g128:mse"),
               "dtypelab int4:g128 (absmax)": _ours(weights, "int4:g128"),
               "quanto qint4": _quanto(weights)}
    rows, notes, verdicts, saved = [], [], [], torch.get_num_threads()
    try:
        for count in threads:
            torch.set_num_threads(count)
            load_before = os.getloadavg()
            seconds = take_turns(methods, rounds)
            load_after = os.getloadavg()
            rows += [[count, *_row(name, seconds[name], seconds["quanto qint4"],
                                   seconds["dtypelab int4:g128 (absmax)"])] for name in methods]
            notes.append(f"{count} thread(s): load average {_load(load_before)} before, {_load(load_after)} "
                         f"after, on {os.cpu_count()} cores shared with other work")
            ratio = statistics.median(_ratios(seconds[COMPILED], seconds["quanto qint4"]))
            verdicts.append(f"{count} thread(s): x{ratio:.2f} -> {'met' if ratio <= 2 else 'NOT met'}")
    finally:
        torch.set_num_threads(saved)
    notes = [f"{len(weights)} Linear weights, {sum(w.numel() for w in weights) / 1e6:.1f} M values; "
             f"{rounds} rounds after one warm-up round, methods in turns; ratios are per round (median, "
             "min-max), so a change of load between rounds does not enter them", *notes,
             f"compiled and eager searches store the same codes, scales and zero points: {same}",
             "one-time cost, a fresh process's first :mse quantization of a 64x256 weight (numba imported, "
             f"its cached machine code loaded): {load_s[0]:.2f} / {load_s[2]:.2f} s compiled, "
             f"{load_s[1]:.2f} / {load_s[3]:.2f} s eager",
             "goal (issue 16 item 3): int4:g128:mse <= 2x quanto qint4: " + "; ".join(verdicts)]
    return Table("The :mse search on minilm's Linear weights", COLUMNS, rows, notes)


def minilm_linear_weights() -> list[torch.Tensor]:
    model = load("minilm", "fp32").model
    return [m.weight.detach() for m in model.modules() if isinstance(m, torch.nn.Linear)]


def _same_codes(weights: list[torch.Tensor], spec: str) -> str:
    """'yes (37/37 weights)' when the compiled and the eager searches store the same bits for every weight."""
    compiled = _with_mode("always", _ours(weights, spec))()
    eager = _with_mode("never", _ours(weights, spec))()
    same = sum(torch.equal(a.data, b.data) and torch.equal(a.scale, b.scale)
               and (a.zero_point is None) == (b.zero_point is None)
               and (a.zero_point is None or torch.equal(a.zero_point, b.zero_point))
               for a, b in zip(compiled, eager, strict=True))
    return f"{'yes' if same == len(weights) else 'NO'} ({same}/{len(weights)} weights)"


def _first_search_seconds(mode: str) -> float:
    """Seconds of a fresh process's first :mse quantization in ``mode`` (after torch's import)."""
    env = {**os.environ, MODE: mode}
    done = subprocess.run([sys.executable, "-c", LOAD_PROBE], env=env, capture_output=True, text=True,
                          check=True)
    return float(done.stdout.strip())


def _with_mode(mode: str, method: Callable[[], object]) -> Callable[[], object]:
    """``method`` run with ``DTYPELAB_MSE_KERNEL=mode`` (the previous value restored after)."""
    def run_in_mode():
        saved = os.environ.get(MODE)
        os.environ[MODE] = mode
        try:
            return method()
        finally:
            if saved is None:
                del os.environ[MODE]
            else:
                os.environ[MODE] = saved
    return run_in_mode


def _ours(weights: list[torch.Tensor], spec: str) -> Callable[[], object]:
    fmt = get_format(spec)
    return lambda: [quantize_tensor(w, fmt) for w in weights]


def _one_by_one(weights: list[torch.Tensor], spec: str) -> Callable[[], object]:
    """The same quantization with the search run one ratio at a time (the module's own loop, which a
    grouped format such as int4:g128 reaches only through ``_search_stacked``, patched here)."""
    fmt, stacked = get_format(spec), qtensor._search_stacked

    def method():
        qtensor._search_stacked = qtensor._search_one_by_one
        try:
            return [quantize_tensor(w, fmt) for w in weights]
        finally:
            qtensor._search_stacked = stacked
    return _with_mode("never", method)


def _quanto(weights: list[torch.Tensor]) -> Callable[[], object]:
    optimizer = MaxOptimizer()

    def method():
        out = []
        for w in weights:
            scale, shift = optimizer(w, qtype=qint4, axis=0, group_size=128)
            out.append(quantize_weight(w, qtype=qint4, axis=0, scale=scale, shift=shift, group_size=128))
        return out
    return method


def _ratios(times: list[float], base: list[float]) -> list[float]:
    return [t / b for t, b in zip(times, base, strict=True)]


def _row(name: str, times: list[float], quanto: list[float], plain: list[float]) -> list:
    vs_quanto, vs_plain = _ratios(times, quanto), _ratios(times, plain)
    return [name, round(statistics.median(times), 4), round(statistics.median(vs_quanto), 2),
            f"{min(vs_quanto):.2f}-{max(vs_quanto):.2f}", round(statistics.median(vs_plain), 2),
            f"{min(vs_plain):.2f}-{max(vs_plain):.2f}"]


def _load(load: tuple[float, float, float]) -> str:
    return "/".join(f"{x:.1f}" for x in load)


if __name__ == "__main__":
    print_table(run())
