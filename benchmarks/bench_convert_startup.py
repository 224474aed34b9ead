"""The fixed cost of a quantized conversion: finding the Linear layers from the headers vs the meta model
(issue 16 item 2).

A small Llama folder (tiny-llama, ~5 MB: the fixed cost dominates) is converted to int4:g32 by the CLI in a
fresh process, three ways taking turns in every round: the header rule (what convert does for the
architectures of ``checkpoint.architecture.HEADER_RULES``), the meta model (the rule table emptied, as for
any other architecture), and ``python -c 'import torch'`` (the floor every run pays). Medians, the min-max
spread over rounds, and the load average before and after.

    python -m benchmarks convert_startup
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import dtypelab
from dtypelab.report import Table

ROUNDS = 7
CONVERT = ("import sys\n{prelude}from dtypelab.cli import main\n"
           "main(['convert', {src!r}, '-o', {dst!r}, '--to', 'int4:g32', '--force', '--quiet'])\n")
METHODS = {
    "header rule": "",
    "meta model": "import dtypelab.checkpoint.architecture as a\na.HEADER_RULES.clear()\n",
}


def run() -> Table:
    work = Path(tempfile.mkdtemp(prefix="bench-convert-startup-"))
    loaded = dtypelab.load("tiny-llama")
    loaded.model.save_pretrained(work / "src")
    scripts = {name: CONVERT.format(prelude=prelude, src=str(work / "src"), dst=str(work / name.split()[0]))
               for name, prelude in METHODS.items()}
    scripts["import torch (floor)"] = "import torch\n"
    load_before = os.getloadavg()[0]
    times: dict[str, list[float]] = {name: [] for name in scripts}
    for _ in range(ROUNDS + 1):  # the first round warms the page cache and is dropped
        for name, script in scripts.items():
            start = time.perf_counter()
            subprocess.run([sys.executable, "-c", script], check=True, capture_output=True)
            times[name].append(time.perf_counter() - start)
    load_after = os.getloadavg()[0]
    times = {name: values[1:] for name, values in times.items()}
    ratios = [h / m for h, m in zip(times["header rule"], times["meta model"], strict=True)]
    above = [h - t for h, t in zip(times["header rule"], times["import torch (floor)"], strict=True)]
    rows = [[name, statistics.median(v), min(v), max(v)] for name, v in times.items()]
    notes = [f"header rule / meta model per round: median {statistics.median(ratios):.2f} "
             f"(min {min(ratios):.2f}, max {max(ratios):.2f})",
             f"header rule minus torch's import per round: median {statistics.median(above):.2f} s "
             f"(min {min(above):.2f}, max {max(above):.2f})",
             f"{ROUNDS} rounds, methods taking turns; load average {load_before:.1f} before, "
             f"{load_after:.1f} after"]
    return Table("Quantized conversion's fixed cost (tiny-llama to int4:g32, fresh process)",
                 ["method", "median s", "min s", "max s"], rows, notes)
