"""Cast throughput against a plain tensor copy of the same bytes (the floor any cast can reach).

A user who casts a model calls ``model.to(dtype)`` (which changes it in place) or
``copy.deepcopy(model).to(dtype)`` (which first copies it in fp32). dtypelab's ``cast_model`` builds the
copy tensor by tensor; here it is timed against both and against ``Tensor.copy_`` of the source bytes.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from dtypelab import cast_model
from dtypelab.report import Table

from .harness import median_seconds, print_table


def _model(hidden: int = 2048, layers: int = 8) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Linear(hidden, hidden) for _ in range(layers)])  # ~134 MB in fp32


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
    return Table(f"Cast throughput ({nbytes / 1e6:.0f} MB of fp32 weights, torch threads="
                 f"{torch.get_num_threads()})", ["method", "median_s", "GB/s read", "x copy time"], rows)


if __name__ == "__main__":
    print_table(run())
