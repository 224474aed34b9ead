"""Reading safetensors headers: ordinary ones in milliseconds, a hostile one refused fast (issue 18 item 5).

What a user would otherwise run is ``safetensors.safe_open`` (which parses the header when the file is
opened), so each header is read both ways, taking turns in every round:

* ordinary headers, in-process: minilm's ``model.safetensors`` (101 tensors) and a SmolLM2-135M-sized
  header (272 llama tensors, the data section a sparse file of the right size): per call,
  ``read_header(path)`` against ``safe_open(path)`` plus its ``keys()``;
* the hostile header of the trial, 95 MB of JSON listing 1.6 M zero-size tensors, each method in a
  fresh process (so its peak resident memory is its own): dtypelab refuses it at the 250,000-tensor
  limit, counted in the raw bytes before parsing; ``safe_open`` parses all of it.

Medians with the min-max spread over rounds, per-round ratios, and the load average before and after.

    python -m benchmarks hostile_headers
"""

from __future__ import annotations

import json
import os
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from dtypelab.checkpoint import read_header
from dtypelab.models.builtins import minilm_path
from dtypelab.report import Table

ROUNDS = 7
CALLS = 50  # ordinary headers: calls per round, so each round's time is well above the timer's resolution
HOSTILE_ROUNDS = 3
HOSTILE_TENSORS = 1_600_000
SMOLLM2_LAYERS, SMOLLM2_WIDTH, SMOLLM2_INNER, SMOLLM2_VOCAB, SMOLLM2_KV = 30, 576, 1536, 49152, 192

HOSTILE_SCRIPT = """
import sys, time
import torch  # both methods hold torch (safe_open's framework="pt" imports it): the same baseline
path, method = sys.argv[1], sys.argv[2]
if method == "dtypelab":
    from dtypelab.checkpoint import read_header
else:
    from safetensors import safe_open

def status(key):
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(key))

open("/proc/self/clear_refs", "w").write("5")  # the peak (VmHWM) starts again from the current RSS
before = status("VmRSS:")
start = time.perf_counter()
try:
    if method == "dtypelab":
        read_header(path)
    else:
        with safe_open(path, framework="pt") as handle:
            len(handle.keys())
    outcome = "read"
except Exception as exc:
    outcome = type(exc).__name__
seconds = time.perf_counter() - start
print(seconds, before, status("VmHWM:"), outcome)
"""


def run() -> Table:
    work = Path(tempfile.mkdtemp(prefix="bench-hostile-headers-"))
    files = {"minilm (101 tensors)": Path(minilm_path()) / "model.safetensors",
             "SmolLM2-135M-sized (272 tensors)": smollm2_sized(work / "smollm2.safetensors")}
    hostile = hostile_file(work / "hostile.safetensors")
    load_before = os.getloadavg()[0]
    rows, notes = [], []
    for label, path in files.items():
        times = take_turns_per_call(path)
        ratios = [d / s for d, s in zip(times["dtypelab"], times["safe_open"], strict=True)]
        for method, values in times.items():
            rows.append([label, method, 1e3 * statistics.median(values), 1e3 * min(values), 1e3 * max(values),
                         "", ""])
        notes.append(f"{label}: dtypelab / safe_open per round median {statistics.median(ratios):.2f} "
                     f"(min {min(ratios):.2f}, max {max(ratios):.2f})")
    hostile_rows, outcomes = hostile_turns(hostile)
    rows += hostile_rows
    notes.append(f"hostile header: {hostile.stat().st_size / 1e6:.0f} MB file, {HOSTILE_TENSORS:,} zero-size "
                 f"tensors; outcomes {outcomes}; peak RSS (VmHWM, reset after imports) and its growth over "
                 f"the RSS after imports, "
                 f"{HOSTILE_ROUNDS} rounds, each method in a fresh process")
    notes.append(f"ordinary headers: {ROUNDS} rounds of {CALLS} calls, ms per call; methods taking turns; "
                 f"load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after")
    return Table("Reading safetensors headers: dtypelab's reader against safe_open",
                 ["header", "method", "median ms", "min ms", "max ms", "peak RSS MB", "growth MB"], rows,
                 notes)


def take_turns_per_call(path: Path) -> dict[str, list[float]]:
    """Seconds per call of each method, per round, taking turns, after a warm-up round."""
    from safetensors import safe_open

    def with_safe_open() -> None:
        with safe_open(str(path), framework="pt") as handle:
            len(handle.keys())

    methods = {"dtypelab": lambda: read_header(path), "safe_open": with_safe_open}
    seconds: dict[str, list[float]] = {name: [] for name in methods}
    for round_index in range(ROUNDS + 1):
        for name, method in methods.items():
            start = time.perf_counter()
            for _ in range(CALLS):
                method()
            if round_index:
                seconds[name].append((time.perf_counter() - start) / CALLS)
    return seconds


def hostile_turns(path: Path) -> tuple[list[list], dict[str, str]]:
    """Each method in a fresh process per round, taking turns: seconds, peak RSS and its growth."""
    measured: dict[str, list[tuple[float, float, float]]] = {"dtypelab": [], "safe_open": []}
    outcomes = {}
    for _ in range(HOSTILE_ROUNDS):
        for method in measured:
            done = subprocess.run([sys.executable, "-c", HOSTILE_SCRIPT, str(path), method], check=True,
                                  capture_output=True, text=True)
            seconds, before, peak, outcome = done.stdout.split()
            measured[method].append((float(seconds), float(peak), float(peak) - float(before)))
            outcomes[method] = outcome
    rows = []
    for method, values in measured.items():
        seconds = [v[0] for v in values]
        rows.append(["hostile (1.6 M tensors, 95 MB)", method, 1e3 * statistics.median(seconds),
                     1e3 * min(seconds), 1e3 * max(seconds), statistics.median(v[1] for v in values) / 1e6,
                     statistics.median(v[2] for v in values) / 1e6])
    return rows, outcomes


def smollm2_sized(path: Path) -> Path:
    """A header with SmolLM2-135M's 272 tensor names and shapes (bf16), the data a sparse file."""
    shapes = {"model.embed_tokens.weight": [SMOLLM2_VOCAB, SMOLLM2_WIDTH],
              "model.norm.weight": [SMOLLM2_WIDTH]}
    for layer in range(SMOLLM2_LAYERS):
        prefix = f"model.layers.{layer}."
        shapes |= {prefix + "input_layernorm.weight": [SMOLLM2_WIDTH],
                   prefix + "post_attention_layernorm.weight": [SMOLLM2_WIDTH],
                   prefix + "self_attn.q_proj.weight": [SMOLLM2_WIDTH, SMOLLM2_WIDTH],
                   prefix + "self_attn.k_proj.weight": [SMOLLM2_KV, SMOLLM2_WIDTH],
                   prefix + "self_attn.v_proj.weight": [SMOLLM2_KV, SMOLLM2_WIDTH],
                   prefix + "self_attn.o_proj.weight": [SMOLLM2_WIDTH, SMOLLM2_WIDTH],
                   prefix + "mlp.gate_proj.weight": [SMOLLM2_INNER, SMOLLM2_WIDTH],
                   prefix + "mlp.up_proj.weight": [SMOLLM2_INNER, SMOLLM2_WIDTH],
                   prefix + "mlp.down_proj.weight": [SMOLLM2_WIDTH, SMOLLM2_INNER]}
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape in shapes.items():
        nbytes = 2 * shape[0] * (shape[1] if len(shape) > 1 else 1)
        header[name] = {"dtype": "BF16", "shape": shape, "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    return write_sparse(path, header, offset)


def hostile_file(path: Path) -> Path:
    """The trial's hostile header: 1.6 M zero-size tensors, ~95 MB of JSON, no data."""
    entry = '"t{:07d}":{{"dtype":"F32","shape":[0],"data_offsets":[0,0]}}'
    raw = ("{" + ",".join(entry.format(i) for i in range(HOSTILE_TENSORS)) + "}").encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw)
    return path


def write_sparse(path: Path, header: dict, data_bytes: int) -> Path:
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-(8 + len(raw)) % 8)
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(raw)) + raw)
        handle.truncate(8 + len(raw) + data_bytes)  # a hole: no data written, the size is right
    return path
