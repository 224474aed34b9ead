"""Forwards the lab can afford (issue 16 item 4): ``compare`` of minilm with 4 quantized variants, with and
without :func:`~dtypelab.quant.dequantized_once`, beside the float32 forwards it cannot do without.

Two inputs: the 64 bundled sentences as one batch (what ``dtypelab compare minilm`` runs: one forward
per model, so caching cannot gain and compare does not cache there; the cache is forced on here to
show it) and the same sentences in 8 batches of 8 (how compare runs a long
text whose logits pass ``OUTPUT_BATCH_BYTES``, and how a sweep sends many forwards through one variant).
Per round, in turns: compare with the cache, compare without it (``dequantized_once`` replaced by a
no-op), and the floor, (N+1) float32 forwards of the same batches (the reference and N variants run
once each). Variants are built once before timing, so quantizing is not in any figure. Ratios are per
round: the median and min-max over rounds, with the load average before and after (shared machine).
"""

from __future__ import annotations

import contextlib
import os
import statistics

import torch

from dtypelab.analysis import compare as compare_module
from dtypelab.analysis import compare_models, run_model, split_rows
from dtypelab.models import load, model_inputs
from dtypelab.quant import quantize_model
from dtypelab.report import Table

from .harness import print_table, take_turns

SPECS = ["int8", "int4:g128", "nf4", "nvfp4"]
ROUNDS = 5
BATCHES = 8
THREADS = 1  # 2 threads on the 2 shared cores measured OpenMP waiting for a busy core (spread 0.2-3x)
COLUMNS = ["input", "cache_s", "per_call_s", "cache / per-call", "cache / per-call min-max", "floor_s",
           "cache / floor", "cache / floor min-max", "per-call / floor"]


def run(rounds: int = ROUNDS, threads: int = THREADS) -> Table:
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _run(rounds)
    finally:
        torch.set_num_threads(saved)


def _run(rounds: int) -> Table:
    loaded = load("minilm", "fp32")
    reference, inputs = loaded.model.eval(), dict(model_inputs(loaded))
    variants = {spec: quantize_model(reference, spec).model.eval() for spec in SPECS}
    rows_per_batch = len(inputs["input_ids"]) // BATCHES
    load_before = os.getloadavg()
    rows = [_scenario("64 sentences, 1 batch", reference, variants, inputs, None, rounds),
            _scenario(f"64 sentences, {BATCHES} batches", reference, variants, inputs, rows_per_batch,
                      rounds)]
    load_after = os.getloadavg()
    notes = [f"minilm, {len(SPECS)} variants ({', '.join(SPECS)}), {rounds} rounds after one warm-up, "
             f"{torch.get_num_threads()} threads; floor = (N+1) float32 forwards of the same batches",
             f"load average {_load(load_before)} before, {_load(load_after)} after, on {os.cpu_count()} "
             "cores shared with other work: ratios, not seconds, are the result",
             "goal (issue 16 item 4): compare of N variants ~ N+1 float32 forwards -> cache / floor"]
    return Table("compare with dequantize-once forwards", COLUMNS, rows, notes)


def _scenario(label, reference, variants, inputs, rows_per_batch, rounds) -> list:
    """One row: cache, per-call and floor seconds per round, taken in turns."""
    batches = [inputs] if rows_per_batch is None else split_rows(inputs, rows_per_batch)
    limit = compare_module.OUTPUT_BATCH_BYTES
    if rows_per_batch is not None:  # compare splits as for a long text: each batch's output under the limit
        hidden = reference.config.hidden_size
        limit = rows_per_batch * inputs["input_ids"].shape[1] * hidden * 4

    def compare(cached: bool) -> None:
        """compare with the cache on every batch count (compare itself skips it for one batch), or with
        ``dequantized_once`` a no-op (today's per-call path)."""
        saved = (compare_module.dequantized_once, compare_module.OUTPUT_BATCH_BYTES,
                 compare_module._dequantize_budget)
        compare_module.OUTPUT_BATCH_BYTES = limit
        if cached:
            compare_module._dequantize_budget = lambda context: {}
        else:
            compare_module.dequantized_once = lambda model, **_: contextlib.nullcontext()
        try:
            result = compare_models(reference, variants, inputs)
        finally:
            (compare_module.dequantized_once, compare_module.OUTPUT_BATCH_BYTES,
             compare_module._dequantize_budget) = saved
        failed = [v.name for v in result.variants if v.failure]
        if result.batches != len(batches) or failed:
            raise RuntimeError(f"compare ran {result.batches} batches, not {len(batches)}; failed: {failed}")

    def floor() -> None:
        for _ in range(len(variants) + 1):
            for batch in batches:
                with torch.no_grad():
                    run_model(reference, batch)

    methods = {"cache": lambda: compare(True), "per_call": lambda: compare(False), "floor": floor}
    seconds = take_turns(methods, rounds)
    cache_vs_call = _ratios(seconds["cache"], seconds["per_call"])
    cache_vs_floor = _ratios(seconds["cache"], seconds["floor"])
    call_vs_floor = _ratios(seconds["per_call"], seconds["floor"])
    return [label, _median(seconds["cache"]), _median(seconds["per_call"]),
            round(statistics.median(cache_vs_call), 2), _spread(cache_vs_call), _median(seconds["floor"]),
            round(statistics.median(cache_vs_floor), 2), _spread(cache_vs_floor),
            round(statistics.median(call_vs_floor), 2)]


def _ratios(times: list[float], base: list[float]) -> list[float]:
    return [t / b for t, b in zip(times, base, strict=True)]


def _median(times: list[float]) -> float:
    return round(statistics.median(times), 3)


def _spread(ratios: list[float]) -> str:
    return f"{min(ratios):.2f}-{max(ratios):.2f}"


def _load(load: tuple[float, float, float]) -> str:
    return "/".join(f"{x:.1f}" for x in load)


if __name__ == "__main__":
    print_table(run())
