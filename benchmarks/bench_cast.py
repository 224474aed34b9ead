"""Cast throughput against a plain tensor copy of the same bytes (the floor any cast can reach).

A user who casts a model calls ``model.to(dtype)`` (which changes it in place) or
``copy.deepcopy(model).to(dtype)`` (which first copies it in fp32). dtypelab's ``cast_model`` builds the
copy tensor by tensor; here it is timed against both and against ``Tensor.copy_`` of the source bytes.
"""

from __future__ import annotations

import copy
import subprocess
import sys

import torch
from torch import nn

from dtypelab import cast_model
from dtypelab.report import Table

from .harness import median_seconds, print_table


def _model(hidden: int = 2048, layers: int = 8) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Linear(hidden, hidden) for _ in range(layers)])  # ~134 MB in fp32


_PEAK_SCRIPT = """
import copy, sys, torch
from torch import nn
from dtypelab import cast_model

def peak_kib():  # VmHWM resets at exec; ru_maxrss would inherit the parent's high-water mark
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM"))

torch.manual_seed(0)
model = nn.Sequential(*[nn.Linear(2048, 2048) for _ in range(8)])
before = peak_kib()
out = cast_model(model, "bf16") if sys.argv[1] == "dtypelab" else copy.deepcopy(model).to(torch.bfloat16)
print((peak_kib() - before) * 1024)
"""


def extra_peak_bytes(method: str) -> int:
    """Peak RSS added by one bf16 cast of the benchmark model, in a fresh process (bytes)."""
    done = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT, method], capture_output=True, text=True,
                          check=True)
    return int(done.stdout.strip())


def run() -> Table:
    model = _model()
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    flat = torch.cat([p.detach().flatten() for p in model.parameters()])
    out = torch.empty_like(flat)
    copy_s = median_seconds(lambda: out.copy_(flat))
    rows = [["Tensor.copy_ (same bytes, fp32)", copy_s, nbytes / copy_s / 1e9, 1.0]]
    for fmt, dtype in [("bf16", torch.bfloat16), ("fp16", torch.float16)]:
        ours = median_seconds(lambda fmt=fmt: cast_model(model, fmt))
        usual = median_seconds(lambda dtype=dtype: copy.deepcopy(model).to(dtype))
        rows.append([f"dtypelab cast_model -> {fmt}", ours, nbytes / ours / 1e9, ours / copy_s])
        rows.append([f"deepcopy(model).to({fmt})", usual, nbytes / usual / 1e9, usual / copy_s])
    fp32_mb = nbytes / 1e6
    for method in ("dtypelab", "deepcopy"):
        rows.append([f"extra peak RSS, {method} -> bf16 (x fp32 size)", "", "",
                     round(extra_peak_bytes(method) / nbytes, 2)])
    title = f"Cast throughput and memory ({fp32_mb:.0f} MB of fp32, {torch.get_num_threads()} threads)"
    return Table(title, ["method", "median_s", "GB/s read", "x copy time / x size"], rows)


if __name__ == "__main__":
    print_table(run())
