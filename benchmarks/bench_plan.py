"""The mixed-precision plan against the mixes people build by hand, at the same size, measured in one run.

smollm2, candidates int4:g64 and int8 (dense possible). The ranking reads the first 8 calibration windows;
every row is measured on the held-out evaluation text (``HELD_OUT_WINDOWS`` windows of 512 tokens) as
next-token KL mean ± standard error, with the bytes the checkpoint stores. Rows:

* uniform int4:g64 and int8 (what ``compare --to`` gives);
* rule-based mixes, llama.cpp's Q4_K_M idea: attention V and FFN down in int8, the rest int4:g64;
  and the first and last blocks in int8, the rest int4:g64;
* the plan at each rule mix's exact size, and at 4.5, 5 and 6 bits per weight;
* NNCF's ``compress_weights(mode=INT4_SYM, ratio, group_size=64)`` where NNCF runs (a row with the reason
  where it does not).

Also the search's own cost: wall time and peak RSS of ranking + solving.
"""

from __future__ import annotations

import importlib.util
import os
import resource
import time

from dtypelab.analysis import measure_plan, plan_model, sensitivity
from dtypelab.models import load, model_inputs
from dtypelab.quant import DENSE, LayerChoice, MixedPlan
from dtypelab.report import Table

HELD_OUT_WINDOWS = 8
LOW, HIGH = "int4:g64", "int8"


def _rule_plan(ranking, name: str, high: callable) -> MixedPlan:
    """Every group in LOW, those ``high(group)`` picks in HIGH (dense where a format cannot hold it)."""
    layers = {}
    for group in ranking.groups:
        fmt = HIGH if high(group) else LOW
        fmt = fmt if not ranking.score(group.name, fmt).problem else DENSE
        for layer in group.layers:
            layers[layer] = LayerChoice(fmt, ranking.layer_bytes[(layer, fmt)])
    return MixedPlan(layers, "smollm2", "", name, ranking.metric)


def run() -> Table:
    loaded = load("smollm2")
    start = time.perf_counter()
    calibration = model_inputs(loaded, text_set="calibration", windows=8)
    ranking = sensitivity(loaded.model, f"{LOW},{HIGH}", calibration, output_kind=loaded.output_kind)
    rank_s = time.perf_counter() - start
    held_out = model_inputs(loaded, text_set="evaluation", windows=HELD_OUT_WINDOWS)
    numel = sum(g.weight_numel for g in ranking.groups)
    blocks = sorted({g.block for g in ranking.groups})
    rules = {"uniform int4:g64": _rule_plan(ranking, "uniform int4:g64", lambda g: False),
             "uniform int8": _rule_plan(ranking, "uniform int8", lambda g: True),
             "Q4_K_M-like (qkv: v is fused with q, k; down in int8)": _rule_plan(
                 ranking, "q4km", lambda g: g.name.endswith(("down_proj", ".qkv"))),
             "first+last block int8": _rule_plan(ranking, "edges",
                                                 lambda g: g.block in (blocks[0], blocks[-1]))}
    rows = []
    for name, plan in rules.items():
        rows.append(_row(name, plan, numel, ranking, loaded, held_out))
        if not name.startswith("uniform"):
            bits = 8 * plan.stored_bytes / numel
            solve_start = time.perf_counter()
            planned = plan_model(ranking, f"{bits:.6f}bpw", model="smollm2")
            rows.append(_row(f"plan at {name}'s size", planned.plan, numel, ranking, loaded, held_out,
                             planned.predicted_damage, time.perf_counter() - solve_start))
    for bits in (4.5, 5.0, 6.0):
        planned = plan_model(ranking, f"{bits}bpw", model="smollm2")
        rows.append(_row(f"plan {bits}bpw", planned.plan, numel, ranking, loaded, held_out,
                         planned.predicted_damage))
    rows.append(_nncf_row())
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    cost = ranking.forward_equivalents["fisher"]
    notes = [f"ranking (fisher, 8 calibration windows): {rank_s:.1f} s, {cost:.2f} reference forwards; peak "
             f"RSS of the whole run {peak_mb:.0f} MB",
             f"measured on {HELD_OUT_WINDOWS} held-out windows of 512 tokens; load average "
             + " ".join(f"{x:.2f}" for x in os.getloadavg())]
    return Table("Plans against hand-made mixes on smollm2 (same run)",
                 ["mix", "bits/weight", "checkpoint bytes", "predicted KL", "measured KL", "± se", "solve s"],
                 rows, notes)


def _row(name, plan, numel, ranking, loaded, held_out, predicted=None, solve_s=None) -> list:
    measured = measure_plan(loaded.model, plan, held_out, model_kind=loaded.kind)
    return [name, 8 * plan.stored_bytes / numel, measured["stored_bytes"], predicted, measured["damage"],
            measured["stderr"], solve_s]


def _nncf_row() -> list:
    if importlib.util.find_spec("nncf") is None:
        return ["NNCF compress_weights INT4_SYM g64", None, None, None, None, None,
                "not run: nncf is not installed here (pip install nncf)"]
    return ["NNCF compress_weights INT4_SYM g64", None, None, None, None, None,
            "not run: NNCF's torch backend is not wired into this benchmark yet"]
