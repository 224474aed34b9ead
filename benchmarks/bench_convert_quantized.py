"""Quantized conversion (compressed-tensors int4:g128 / int8) against the in-memory script and ``cp``.

The in-memory script is what one writes with the same library calls but no streaming: for each shard,
``load_file`` -> quantize every Linear weight whole (dtypelab's own quantizer, so the output is the
same) -> ``save_file``. ``dtypelab convert`` streams row chunks instead, and counts what each weight lost
(the report it writes); the script's counted variant does that too (``quantize_counted``, the same
damage records), which is what one writes to get the same checkpoint *and* report. Each method runs in its own
process under ``/usr/bin/time`` (see :mod:`benchmarks.bench_convert`); warm runs only, medians.
The checkpoint is a Llama-shaped fp32 model (hidden 2048, 4 or 8 layers: ~1 and ~2 GiB) written
once under ``.bench/convert-quantized/`` from random tensors of the right names and shapes.
"""

from __future__ import annotations

import compileall
import os
import shutil
import statistics
from pathlib import Path

import torch

from dtypelab.report import Table

from .bench_convert import PY, ROOT, is_built, run_once, spread, write_two_shards
from .harness import print_table

BENCH_DIR = ROOT / ".bench" / "convert-quantized"

_SCRIPT = """
import pathlib, sys, torch
from safetensors.torch import load_file, save_file
from dtypelab.checkpoint import linear_layers, to_parts
from dtypelab.formats import get_format
from dtypelab.quant import NAMES
src, dst, fmt = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2]), get_format(sys.argv[3])
dst.mkdir()
linears, heads, _ = linear_layers(src)
SETUP
for shard in sorted(src.glob("*.safetensors")):
    out = {}
    for name, tensor in load_file(shard).items():
        module = name.removesuffix(".weight")
        if module in linears and module not in heads:
            QUANTIZE
            out.update({f"{module}.{k}": v for k, v in to_parts(qt).items()})
        else:
            out[name] = tensor
    save_file(out, dst / shard.name, metadata={"format": "pt"})
"""


def _script_text(names: str, setup: str, quantize: str) -> str:
    """The script's text with its imports from ``dtypelab.quant``, a setup line and the quantize line."""
    return _SCRIPT.replace("NAMES", names).replace("SETUP\n", setup).replace("QUANTIZE", quantize)


IN_MEMORY_SCRIPT = _script_text("quantize_tensor", "", "qt = quantize_tensor(tensor, fmt)")
COUNTED_SCRIPT = _script_text("Workspace, quantize_counted", "damage, work = [], Workspace()\n",
                         "qt, counted = quantize_counted(tensor, fmt, work)\n"
                         "            damage.append(counted)")
"""The script that also counts each weight's damage, as ``convert`` reports it (kept in ``damage``), its
temporaries in one ``Workspace`` reused from weight to weight (the API's own way to spare fresh memory)."""


def make_checkpoint(layers: int) -> Path:
    """A Llama-shaped fp32 checkpoint with ``layers`` layers in two shards (reused when present)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = BENCH_DIR / f"llama-{layers}l"
    if is_built(folder):
        return folder
    config = LlamaConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=layers,
                         num_attention_heads=16, num_key_value_heads=16, vocab_size=8192,
                         tie_word_embeddings=False, architectures=["LlamaForCausalLM"])
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in LlamaForCausalLM(config).state_dict().items()}
    generator, names = torch.Generator().manual_seed(0), sorted(shapes)
    parts = {1: names[: len(names) // 2], 2: names[len(names) // 2:]}
    write_two_shards(folder, lambda shard: {k: torch.randn(shapes[k], generator=generator) * 0.02
                                            for k in parts[shard]})
    config.save_pretrained(folder)
    (folder / "done").write_text("")
    return folder


def commands(src: Path, dst: Path) -> dict[str, list[str]]:
    convert = [PY, "-c", "from dtypelab.cli import entry; entry()", "convert", str(src), "-o", str(dst),
               "--quiet", "--to"]
    one_thread = "import torch; torch.set_num_threads(1)\n" + IN_MEMORY_SCRIPT
    return {"cp -r (floor)": ["cp", "-r", str(src), str(dst)],
            IN_MEMORY: [PY, "-c", IN_MEMORY_SCRIPT, str(src), str(dst), "int4:g128"],
            IN_MEMORY_1T: [PY, "-c", one_thread, str(src), str(dst), "int4:g128"],
            COUNTED: [PY, "-c", COUNTED_SCRIPT, str(src), str(dst), "int4:g128"],
            OURS: [*convert, "int4:g128"],
            "dtypelab convert, int8": [*convert, "int8"]}


IN_MEMORY, IN_MEMORY_1T = "in-memory script, int4:g128", "in-memory script, int4:g128, 1 thread"
COUNTED = "in-memory script + damage count, int4:g128"
OURS = "dtypelab convert, int4:g128"
ROUNDS = 3


def run() -> Table:
    compileall.compile_dir(ROOT / "src" / "dtypelab", quiet=1)  # as pip compiles an installed package
    rows, dst, results, notes, load_before = [], BENCH_DIR / "out", {}, [], os.getloadavg()
    for layers in (4, 8):
        src = make_checkpoint(layers)
        size = sum(p.stat().st_size for p in src.glob("*.safetensors"))
        methods = commands(src, dst)
        runs: dict[str, list] = {label: [] for label in methods}
        for repeat in range(ROUNDS + 1):  # methods take turns: load from other processes falls on all
            for label, command in methods.items():
                result = run_once(command, src, dst, cold=False)
                if repeat:  # the first round warms up
                    runs[label].append(result)
        for label, got in runs.items():
            wall, peak = statistics.median(r["s"] for r in got), max(r["peak_bytes"] for r in got)
            results[label, layers] = peak
            ratios = [a["s"] / b["s"] for a, b in zip(got, runs[IN_MEMORY_1T], strict=True)]
            rows.append([label, round(size / 2**30, 2), wall, statistics.median(r["cpu_s"] for r in got),
                         statistics.median(ratios), f"{min(ratios):.2f}-{max(ratios):.2f}", peak / 2**20,
                         peak / size])
        same = (f"torch's {torch.get_num_threads()} threads (dtypelab: one quantizing, one counting; "
                "goal <= 1.0x)")
        for script, threads in ((IN_MEMORY, same), (IN_MEMORY_1T, "1 thread"),
                                (COUNTED, "torch's threads, counting the same damage")):
            ours = [a["s"] / b["s"] for a, b in zip(runs[OURS], runs[script], strict=True)]
            cpu = [a["cpu_s"] / b["cpu_s"] for a, b in zip(runs[OURS], runs[script], strict=True)]
            notes.append(f"{round(size / 2**30, 2)} GiB: dtypelab int4:g128 / in-memory script at {threads}, "
                         f"per round: wall {spread(ours)}, CPU {spread(cpu)}")
        shutil.rmtree(dst, ignore_errors=True)
    growth = {label: results[label, 8] / results[label, 4] for label, n in results if n == 4}
    notes = [f"machine: {os.cpu_count()} cores; load average {load_before[0]:.1f} before, "
             f"{os.getloadavg()[0]:.1f} after; {ROUNDS} rounds after a warm-up round; x in-memory 1 thread: "
             "each run over the 1-thread script's run of the same round (dtypelab quantizes on one torch "
             "thread and counts each chunk's damage on a second)",
             *notes, "peak RSS 8 layers / 4 layers: " + ", ".join(f"{label} {ratio:.2f}x"
                                                               for label, ratio in growth.items())
             + " (flat = 1.00x)"]
    return Table(f"Quantized conversion (compressed-tensors), warm, medians of {ROUNDS}, methods alternating",
                 COLUMNS, rows, notes)


COLUMNS = ["method", "GiB fp32", "warm_s", "warm_cpu_s", "x in-memory 1 thread", "min-max", "peak RSS MiB",
           "peak RSS x ckpt"]


if __name__ == "__main__":
    print_table(run())
