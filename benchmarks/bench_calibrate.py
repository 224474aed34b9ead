"""GPTQ and AWQ beside round to nearest, the data-free peers and llm-compressor's GPTQ (issue 14).

Each calibrated variant is built in its own process (its wall time and peak RSS are that process's: model
load included in the RSS, excluded from the seconds), on the same calibration token ids (the bundled
calibration text, ``CALIB_TOKENS`` tokens in windows of 512); llm-compressor runs ``oneshot`` with
``GPTQModifier`` on those ids in a process of its own, from packages installed beside the venv
(``LLMC_PATH``: it pins transformers <= 5.17, which the project's venv does not take), and its
compressed-tensors folder is loaded back by dtypelab. Every variant is then measured in one ``compare``
against float32 on the held-out evaluation text.

    python -m benchmarks bench_calibrate                   # smollm2, all 29 windows
    BENCH_MODEL=minilm python -m benchmarks bench_calibrate
    BENCH_WINDOWS=8 python -m benchmarks bench_calibrate   # quicker, noisier
    BENCH_BITS=3 python -m benchmarks bench_calibrate      # the 3-bit-class budget (int3)

gptqmodel gets a row with the reason it does not run here (its releases need newer torch and
transformers than the venv's, see ``GPTQMODEL_REASON``).
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

import dtypelab
from dtypelab.models import cached_gguf_folder, smollm2_gguf
from dtypelab.report import Table
from dtypelab.variants import build_variants, calibration_data

MODEL = os.environ.get("BENCH_MODEL", "smollm2")
WINDOWS = int(os.environ["BENCH_WINDOWS"]) if os.environ.get("BENCH_WINDOWS") else None
CALIB_TOKENS = int(os.environ.get("BENCH_CALIB_TOKENS", "8192"))
LLMC_PATH = os.environ.get("LLMC_PATH", "/tmp/llmc-pkgs")
GROUP = {"smollm2": 64, "minilm": 128}
THREADS = 2  # pinned: codes are bit-identical for the same text, settings and thread count
BITS = int(os.environ.get("BENCH_BITS", "4"))
GPTQMODEL_REASON = ("not run: gptqmodel 7.7.0 (the current release) requires torch >= 2.14.1; this venv "
                    "holds the torch 2.13.0 CPU wheel the project pins")


def specs(model: str) -> tuple[list[str], list[str]]:
    """(our formats, peers) compared on ``model``."""
    g = GROUP.get(model, 128)
    ours = [f"int{BITS}:g{g}", f"int{BITS}:g{g}:mse", f"int{BITS}:g{g}:gptq", f"int{BITS}:g{g}:awq"]
    peers = ["quanto:qint4", "torchao:intx4"] if BITS == 4 else []  # quanto has no 3-bit type
    return ours, peers


def run() -> Table:
    torch.set_num_threads(THREADS)
    loaded = dtypelab.load(MODEL, "fp32")
    held_out = dtypelab.model_inputs(loaded, text_set="evaluation", windows=WINDOWS) \
        if loaded.output_kind == "logits" else dtypelab.model_inputs(loaded)
    ours, peers = specs(MODEL)
    work = Path(tempfile.mkdtemp(prefix="bench-calibrate-"))
    ids_file = work / "calibration.safetensors"
    data = calibration_data(loaded, calib_tokens=CALIB_TOKENS)
    save_file({"input_ids": torch.cat([b["input_ids"] for b in data.batches])}, str(ids_file))
    built, costs = {}, {}
    for spec in ours:
        costs[spec] = _child(["--ours", spec, str(ids_file), str(work / f"{spec}.pt")])
        built[spec] = torch.load(work / f"{spec}.pt", weights_only=False)
    costs["llmcompressor:gptq"] = _llmcompressor(loaded, ids_file, work)
    costs["gptqmodel:gptq"] = {"failure": GPTQMODEL_REASON}
    if costs["llmcompressor:gptq"].get("folder"):
        built["llmcompressor:gptq"] = dtypelab.load(costs["llmcompressor:gptq"]["folder"], "fp32").model
    start = time.perf_counter()
    variants = {**build_variants(loaded.model, peers), **built}
    peer_seconds = time.perf_counter() - start
    result = dtypelab.compare_models(loaded.model, variants, held_out, output_kind=loaded.output_kind,
                                     model_kind=loaded.kind)
    return _table(result, costs, data, peer_seconds)


def _child(args: list[str]) -> dict:
    """Run one build in a fresh process; its JSON line (seconds, peak RSS) or the failure."""
    done = subprocess.run([sys.executable, "-m", "benchmarks.bench_calibrate", *args], capture_output=True,
                          text=True, env={**os.environ, "BENCH_MODEL": MODEL})
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode or not lines:
        return {"failure": (done.stderr.strip().splitlines() or ["no output"])[-1][:200]}
    return json.loads(lines[-1])


def _llmcompressor(loaded, ids_file: Path, work: Path) -> dict:
    """llm-compressor's GPTQ (oneshot, GPTQModifier, same scheme and ids) in its own process
    (:mod:`benchmarks.llmc_gptq`, which imports no dtypelab: its transformers is llm-compressor's)."""
    if MODEL != "smollm2":
        return {"failure": "run here for the causal LM (smollm2) only"}
    if not Path(LLMC_PATH).is_dir():
        return {"failure": f"not installed beside the venv ({LLMC_PATH}): it pins transformers <= 5.17"}
    source = cached_gguf_folder(Path(smollm2_gguf()))
    env = {**os.environ, "PYTHONPATH": LLMC_PATH + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run([sys.executable, "-m", "benchmarks.llmc_gptq", str(source), str(ids_file),
                           str(work / "llmc"), str(GROUP[MODEL]), str(THREADS), str(BITS)],
                          capture_output=True, text=True, env=env)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode or not lines:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1][:200]
        return {"failure": f"llm-compressor: {last}"}
    return json.loads(lines[-1])


def _table(result, costs: dict, data, peer_seconds: float) -> Table:
    logits = result.logits
    columns = ["variant", "bits/elem", "calib s", "peak RSS MB"]
    columns += ["KL mean ± se", "ln PPL ratio ± se", "same top p ± se"] if logits else ["SQNR dB", "cosine"]
    rows = []
    for v in result.variants:
        cost = costs.get(v.name, {})
        row = [v.name, v.bits_per_element, cost.get("seconds"), cost.get("peak_rss_mb")]
        nt = v.next_token
        if logits and nt is not None:
            row += [f"{nt.kl_mean:.4g} ± {nt.kl_stderr:.2g}", f"{nt.ln_ppl_ratio:.4g} ± "
                    f"{nt.ln_ppl_ratio_stderr:.2g}", f"{nt.same_top_p:.2%} ± {nt.same_top_p_stderr:.2%}"]
        elif not logits and v.metrics is not None:
            row += [v.metrics.sqnr_db, v.embedding_cosine_mean]
        else:
            row += [v.failure or cost.get("failure", "")] + [""] * (2 if logits else 1)
        rows.append(row)
    for name, cost in costs.items():
        if "failure" in cost:
            rows.append([name, None, None, None, f"failed: {cost['failure']}"] + [""] * (2 if logits else 1))
    measured_on = "the held-out evaluation text" if logits else "the bundled sentences"
    notes = [f"{MODEL}; calibration: {data.tokens} tokens of the bundled calibration text in windows of "
             f"{data.ctx}; measured on {measured_on}, {result.positions:,} positions; {THREADS} threads; "
             f"peers built in {peer_seconds:.1f} s together"]
    return Table(f"Calibrated int{BITS} on {MODEL} (issue 14)", columns, rows, notes)


def _ours(spec: str, ids_file: str, out: str) -> None:
    torch.set_num_threads(THREADS)
    loaded = dtypelab.load(MODEL, "fp32")
    ids = load_file(ids_file)["input_ids"]
    batches = [{"input_ids": ids[i:i + 4], "attention_mask": torch.ones_like(ids[i:i + 4])}
               for i in range(0, len(ids), 4)]
    start = time.perf_counter()
    result = dtypelab.quantize_model(loaded.model, spec, calibration=batches)
    seconds = time.perf_counter() - start
    torch.save(result.model, out)
    print(json.dumps({"seconds": round(seconds, 1), "peak_rss_mb": _peak_rss_mb()}))


def _peak_rss_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


if __name__ == "__main__":
    if sys.argv[1] == "--ours":
        _ours(*sys.argv[2:5])
