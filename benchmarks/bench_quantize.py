"""Every quantized format on minilm beside optimum-quanto's and torchao's, measured in one run.

Per variant: bytes of ``torch.save(state_dict)`` and its ratio to fp32, bits per parameter, output SQNR
of ``last_hidden_state`` over real (unpadded) tokens of dtypelab's 64 bundled sentences, time to
quantize, and the median forward latency after warm-up beside fp32's. The notes check the issue's goals
against the peers measured in this same run (SQNR depends on the inputs, so only same-run comparisons
count).
"""

from __future__ import annotations

import gc
import io
import math
import statistics
import time

import torch
from torch import nn

from dtypelab.analysis import paired_latency_ms, sqnr_db
from dtypelab.models import load, model_inputs
from dtypelab.quant import quantize_model
from dtypelab.report import Table
from dtypelab.variants import apply_format, run_peer

from .harness import median_seconds, print_table

OURS = ["bf16", "fp16", "fp8_e4m3", "fp8_e5m2", "int8", "int8:a8", "fp8_e4m3:afp8", "int4:g128",
        "int4:g128:mse", "int4:g128:asym", "int4:g128:asym:mse", "nf4", "mxfp8", "mxfp4", "nvfp4"]
PEERS = ["quanto:qint8", "quanto:qfloat8", "quanto:qint4", "torchao:int8wo", "torchao:int4wo",
         "torchao:intx4"]
# Per-channel absmax int8 / e4m3 is the same algorithm in quanto; outputs differ only by float summation
# order in the matmul (quanto scales after it), worth ~1e-4 dB. "No worse" allows that, nothing more.
SAME_ALGORITHM_DB = 0.005
COLUMNS = ["variant", "embeddings", "saved_MB", "x fp32", "bits/param", "sqnr_db", "quantize_s",
           "fwd_ms", "x fp32 ms", "note"]


def load_minilm() -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """minilm in float32 and dtypelab's 64 bundled sentences, tokenised and padded."""
    loaded = load("minilm", "fp32")
    return loaded.model.eval(), dict(model_inputs(loaded))


def saved_bytes(model: nn.Module) -> int:
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return len(buffer.getvalue())


def hidden(model: nn.Module, inputs: dict, mask: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).last_hidden_state[mask]  # (real tokens, hidden)


class Bench:
    """Holds the reference, its output and timing; measures one variant into one row."""

    def __init__(self) -> None:
        self.model, self.inputs = load_minilm()
        self.mask = self.inputs["attention_mask"].bool()
        self.reference = hidden(self.model, self.inputs, self.mask)
        self.fp32_bytes = saved_bytes(self.model)
        self.params = sum(p.numel() for p in self.model.parameters())
        self.fp32_ms: list[float] = []  # fp32's median from each pairing
        self.rows: list[list] = []

    def measure(self, name: str, embeddings: str, build) -> None:
        gc.collect()
        try:
            variant = build()
        except Exception as exc:  # a failed variant (PeerError, nothing to quantize) is a row with its reason
            self.rows.append([name, embeddings, *[None] * 7, f"failed: {str(exc)[:150]}"])
            return
        seconds = median_seconds(build, repeat=3, warmup=0)  # first build above was the warm-up
        size = saved_bytes(variant)
        fp32_ms, ms = paired_latency_ms([self.model, variant], self.inputs, warmup=3, runs=9)
        self.fp32_ms.append(fp32_ms)
        sqnr = sqnr_db(self.reference, hidden(variant, self.inputs, self.mask))
        note = f"slower than fp32 (x{ms / fp32_ms:.2f})" if ms > fp32_ms else ""
        self.rows.append([name, embeddings, size / 1e6, round(size / self.fp32_bytes, 3),
                          round(size * 8 / self.params, 2), sqnr, seconds, ms, round(ms / fp32_ms, 2), note])

    def sqnr(self, name: str, embeddings: str = "fp32") -> float:
        row = next((r for r in self.rows if r[0] == name and r[1] == embeddings), None)
        return row[5] if row and row[5] is not None else math.nan

    def field(self, name: str, embeddings: str, column: str) -> float:
        row = next((r for r in self.rows if r[0] == name and r[1] == embeddings), None)
        value = row[COLUMNS.index(column)] if row else None
        return math.nan if value is None else value


def goal_notes(bench: Bench) -> list[str]:
    """The issue's goals, each checked against the peer measured in this run."""
    s = bench.sqnr
    checks = [
        ("int8 no worse than quanto qint8 (dB)", s("int8"), s("quanto:qint8"),
         s("int8") >= s("quanto:qint8") - SAME_ALGORITHM_DB),
        ("fp8_e4m3 no worse than quanto qfloat8 (dB)", s("fp8_e4m3"), s("quanto:qfloat8"),
         s("fp8_e4m3") >= s("quanto:qfloat8") - SAME_ALGORITHM_DB),
        ("int4:g128:mse >= quanto qint4 + 1 dB (4.125 vs 4.5 bits/weight)", s("int4:g128:mse"),
         s("quanto:qint4"), s("int4:g128:mse") >= s("quanto:qint4") + 1),
        ("int4:g128:asym:mse >= quanto qint4 + 1 dB (4.19 vs 4.5 bits/weight)", s("int4:g128:asym:mse"),
         s("quanto:qint4"), s("int4:g128:asym:mse") >= s("quanto:qint4") + 1),
    ]
    notes = [f"goal {label}: ours {a:.3f} vs peer {b:.3f} -> {'met' if ok else 'NOT met'}"
             for label, a, b, ok in checks]
    ratio = bench.field("int8", "quantized", "x fp32")
    verdict = "met" if ratio <= 0.3 else "NOT met"
    notes.append(f"goal int8 with embeddings <= 0.3x fp32 bytes: {ratio:.3f} -> {verdict}")
    for ours_spec, peer_spec in (("int8", "quanto:qint8"), ("int4:g128:asym:mse", "quanto:qint4")):
        ours, peer = paired_build_seconds(bench.model, ours_spec, peer_spec)
        notes.append(f"goal quantize no slower than quanto ({ours_spec} vs {peer_spec}, alternated, median "
                     f"of 5): {ours:.3f} s vs {peer:.3f} s -> {'met' if ours <= peer else 'NOT met'}")
    return notes


def paired_build_seconds(model: nn.Module, ours: str, peer: str, repeat: int = 5) -> tuple[float, float]:
    """Median seconds to quantize ``model`` with our spec and with the peer, built alternately."""
    builds = (lambda: apply_format(model, ours, embeddings=False), lambda: run_peer(model, peer).model)
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(repeat + 1):  # the first round warms up
        for build, series in zip(builds, times, strict=True):
            gc.collect()
            start = time.perf_counter()
            build()
            series.append(time.perf_counter() - start)
    return statistics.median(times[0][1:]), statistics.median(times[1][1:])


def run() -> Table:
    torch.manual_seed(0)
    bench = Bench()
    for spec in OURS:
        bench.measure(spec, "fp32", lambda spec=spec: apply_format(bench.model, spec, embeddings=False))
        if spec not in ("bf16", "fp16"):
            bench.measure(spec, "quantized",
                          lambda spec=spec: quantize_model(bench.model, spec, embeddings=True).model)
    for peer in PEERS:
        bench.measure(peer, "fp32", lambda peer=peer: run_peer(bench.model, peer).model)
    fp32_ms = statistics.median(bench.fp32_ms)
    texts = len(bench.inputs["input_ids"])
    notes = [f"fp32: {bench.fp32_bytes / 1e6:.1f} MB saved, forward {fp32_ms:.1f} ms (the {texts} "
             f"bundled sentences; each variant timed alternating with fp32, median of 9 after 3 warm-up), "
             f"{torch.get_num_threads()} threads",
             "saved_MB: len(torch.save(state_dict)); sqnr over last_hidden_state of real tokens",
             *goal_notes(bench)]
    title = "Quantized minilm: size, error and speed beside quanto / torchao"
    return Table(title, COLUMNS, bench.rows, notes)


if __name__ == "__main__":
    print_table(run())
