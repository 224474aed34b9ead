"""``headroom``'s cost in forwards: ``predict_headroom(minilm, 64 bundled sentences, fp16[, bf16])``
against one plain float32 forward of the same inputs (issue 15, item 4: "at most a few forwards").

Each round times a forward and then the prediction back to back, so both see the same machine load; the
figure is the median over rounds of headroom seconds / forward seconds, with the lowest and highest
round's ratio as its spread. The prediction includes its verification runs (the cast model run once per
format to check the keep list).
"""

from __future__ import annotations

import statistics
import time

from dtypelab.analysis import predict_headroom, run_model
from dtypelab.models import load, model_inputs
from dtypelab.report import Table

from .harness import print_table

ROUNDS = 3


def _seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def run() -> Table:
    loaded = load("minilm", "fp32")
    inputs = model_inputs(loaded)
    run_model(loaded.model, inputs)  # warm-up
    rows = []
    for formats in (["fp16"], ["fp16", "bf16"]):
        predict_headroom(loaded.model, inputs, formats)  # warm-up
        ratios, forwards = [], []
        for _ in range(ROUNDS):
            forward = _seconds(lambda: run_model(loaded.model, inputs))
            headroom = _seconds(lambda f=formats: predict_headroom(loaded.model, inputs, f))
            ratios.append(headroom / forward)
            forwards.append(forward)
        rows.append([",".join(formats), statistics.median(forwards), statistics.median(ratios), min(ratios),
                     max(ratios)])
    return Table("headroom minilm: predict_headroom time in plain forwards (median of 3 rounds)",
                 ["--to", "forward s", "x forward", "lowest", "highest"], rows)


if __name__ == "__main__":
    print_table(run())
