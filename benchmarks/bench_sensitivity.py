"""How well the fast sensitivity prediction ranks layer groups against the exact truth, and its cost.

Per model and format: Spearman's rank correlation of the Fisher prediction with the exact damage (one
forward per layer group with only that group quantized), both on the same calibration windows, and
each method's wall time in reference forwards on those inputs (same run). Issue 13's goal: ρ ≥ 0.9 at
no more than three forward-equivalents per format.

``DTYPELAB_BENCH_SMOLLM2=0`` leaves smollm2 out (its exact pass is ~240 forwards of 512 tokens).
"""

from __future__ import annotations

import os
import time

from dtypelab.analysis import sensitivity
from dtypelab.models import load, model_inputs
from dtypelab.report import Table

CASES = [("minilm", "int4:g128,fp8_e4m3", 4), ("smollm2", "int4:g64,fp8_e4m3", 2)]
"""(model, formats, calibration windows of 512 tokens)."""


def run() -> Table:
    rows, notes = [], []
    for model, formats, windows in CASES:
        if model == "smollm2" and os.environ.get("DTYPELAB_BENCH_SMOLLM2") == "0":
            notes.append("smollm2 left out (DTYPELAB_BENCH_SMOLLM2=0)")
            continue
        loaded = load(model)
        inputs = model_inputs(loaded, text_set="calibration", windows=windows)
        start = time.perf_counter()
        result = sensitivity(loaded.model, formats, inputs, exact=True, output_kind=loaded.output_kind)
        wall = time.perf_counter() - start
        per_format = result.forward_equivalents["fisher"] / len(result.formats)
        for fmt in result.formats:
            rows.append([model, fmt, len(result.groups), result.positions, result.spearman[fmt],
                         per_format, result.forward_equivalents["exact"] / len(result.formats), wall])
    load_avg = os.getloadavg()
    notes.append(f"load average after: {load_avg[0]:.2f} {load_avg[1]:.2f} {load_avg[2]:.2f}")
    columns = ["model", "format", "groups", "positions", "spearman", "fisher fwd/format", "exact fwd/format",
               "total s"]
    return Table("Sensitivity: Fisher prediction vs exact ranking", columns, rows, notes)
