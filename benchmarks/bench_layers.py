"""Peak memory of the layer-wise comparison against a plain forward, on a tiny causal LM with a long sequence.

A user tracing errors by hand keeps every module's output of both models in hook dicts and compares
them afterwards; dtypelab runs the two models in lock-step and drops each pair once measured (then, by
default, one more forward of a rounded weight copy for the noise floor: measured with and without). Each
method runs in a fresh process (VmHWM resets at exec); the extra peak RSS over the RSS before the
call is reported in bytes, as a multiple of a plain forward's extra peak, and in units of the largest
single activation (the fp32 logits here). glibc's mmap threshold is pinned so freed tensors go back
to the OS at once and RSS follows live memory.
"""

from __future__ import annotations

import os
import subprocess
import sys

from dtypelab.report import Table

from .harness import print_table

SEQ, VOCAB, HIDDEN, INNER, LAYERS = 2048, 4096, 256, 1024, 4
FOUR = "fp16,bf16,int8,fp8_e4m3"
"""The ``--to`` list of the four-variant rows: peak memory grows with it only when every variant is
built before the comparison starts."""

_PEAK_SCRIPT = f"""
import sys, torch
from transformers import LlamaConfig, LlamaForCausalLM
from dtypelab import cast_model
from dtypelab.analysis import compare_layers, output_metrics, run_model, select_output
from dtypelab.variants import iter_variants

def status(key):
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(key))

def naive(reference, variant, ids):  # the by-hand way: keep every output of both, then compare
    outs = []
    for model in (reference, variant):
        kept = {{}}
        hooks = [m.register_forward_hook(lambda m, a, o, n=n: kept.__setitem__(n, select_output(o)) and None)
                 for n, m in model.named_modules() if n]
        with torch.inference_mode():
            run_model(model, ids)
        for h in hooks:
            h.remove()
        outs.append(kept)
    return [output_metrics(outs[0][n], outs[1][n]) for n in outs[0] if outs[0][n].is_floating_point()]

config = LlamaConfig(vocab_size={VOCAB}, hidden_size={HIDDEN}, intermediate_size={INNER},
                     num_hidden_layers={LAYERS}, num_attention_heads=4, num_key_value_heads=4,
                     max_position_embeddings={SEQ})
torch.manual_seed(0)
reference = LlamaForCausalLM(config).eval()
method = sys.argv[1]
variant = None if method.startswith("four") else cast_model(reference, "bf16")  # the four build their own
ids = torch.randint(0, {VOCAB}, (1, {SEQ}))
FOUR = {FOUR!r}
run = {{
    "forward": lambda i: run_model(reference, i),
    "naive": lambda i: naive(reference, variant, i),
    "lockstep": lambda i: compare_layers(reference, {{"bf16": variant}}, i, noise_floor=False),
    "propagated": lambda i: compare_layers(reference, {{"bf16": variant}}, i),
    "isolated-lockstep": lambda i: compare_layers(reference, {{"bf16": variant}}, i, mode="isolated",
                                                  noise_floor=False),
    "isolated": lambda i: compare_layers(reference, {{"bf16": variant}}, i, mode="isolated"),
    # compare --layers --to FOUR: every variant built first (as the CLI did), or one at a time (as it does)
    "four-at-once": lambda i: compare_layers(reference, list(iter_variants(reference, FOUR)), i,
                                             noise_floor=False),
    "four-one-at-a-time": lambda i: compare_layers(reference, iter_variants(reference, FOUR), i,
                                                   noise_floor=False),
}}[method]

with torch.inference_mode():
    run(ids[:, :8])  # warm-up on a short sequence: lazy imports and kernels, little memory
before = status("VmRSS")
with torch.inference_mode():
    run(ids)
print(status("VmHWM") - before)
"""

METHODS = [("forward", "plain forward of the fp32 model (baseline)"),
           ("naive", "hooks keeping every output of fp32 + bf16, then compare"),
           ("lockstep", "dtypelab compare_layers, propagated, noise_floor=False"),
           ("propagated", "dtypelab compare_layers, propagated (+ noise floor)"),
           ("isolated-lockstep", "dtypelab compare_layers, isolated, noise_floor=False"),
           ("isolated", "dtypelab compare_layers, isolated (+ noise floor)"),
           ("four-at-once", "--layers, 4 variants, all built first (before)"),
           ("four-one-at-a-time", "--layers, 4 variants, one at a time (now)")]  # labels under LONG_CELL


def extra_peak_bytes(method: str) -> int:
    """Peak RSS added by one call of ``method``, in a fresh process (bytes)."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT, method], capture_output=True, text=True,
                          check=True, env=env)
    return int(done.stdout.strip().splitlines()[-1])


def run(methods: list[str] | None = None) -> Table:
    """Every method's extra peak (or only ``methods``, and the plain forward they are measured against)."""
    largest = SEQ * VOCAB * 4  # the fp32 logits, (1, seq, vocab)
    chosen = [(m, label) for m, label in METHODS if methods is None or m in methods or m == "forward"]
    peaks = {method: extra_peak_bytes(method) for method, _ in chosen}
    rows = [[label, round(peaks[m] / 2**20, 1), round(peaks[m] / peaks["forward"], 2),
             round((peaks[m] - peaks["forward"]) / largest, 2)] for m, label in chosen]
    title = (f"Layer-wise comparison memory: Llama {LAYERS} layers, hidden {HIDDEN}, vocab {VOCAB}, "
             f"seq {SEQ}; largest activation {largest / 2**20:.0f} MiB")
    return Table(title, ["method", "extra peak MiB", "x forward", "extra over forward / largest act"], rows)


if __name__ == "__main__":  # python -m benchmarks.bench_layers [METHOD ...]: only those (and forward)
    print_table(run(sys.argv[1:] or None))
