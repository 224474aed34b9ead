"""compare's measured forwards dequantize each quantized weight once per variant (issue 16 item 4), and
its numbers are exactly those of the per-call path."""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from dtypelab.analysis import compare as compare_module
from dtypelab.analysis import compare_models
from dtypelab.quant import quantize_model


def test_batched_compare_dequantizes_once_per_layer_with_identical_metrics(monkeypatch, dequantize_calls):
    torch.manual_seed(0)
    reference = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 32)).eval()
    variants = {spec: quantize_model(reference, spec).model for spec in ("int8", "int4:g32")}
    inputs = torch.randn(12, 64)
    monkeypatch.setattr(compare_module, "OUTPUT_BATCH_BYTES", 3 * 32 * 4)  # 3 rows a batch: 4 batches
    calls = dequantize_calls
    cached = compare_models(reference, variants, inputs, keep_outputs=True)
    assert cached.batches == 4
    assert calls[0] == 2 * 2  # two layers per variant, once each for all four batches
    monkeypatch.setattr(compare_module, "dequantized_once", lambda model, **_: contextlib.nullcontext())
    per_call = compare_models(reference, variants, inputs, keep_outputs=True)
    assert calls[0] == 2 * 2 + 2 * 2 * 4
    for a, b in zip(cached.variants, per_call.variants, strict=True):
        assert a.metrics == b.metrics and torch.equal(a.output, b.output)


def test_one_batch_caches_nothing(monkeypatch):
    """One batch runs each layer once: compare holds no dequantized copy for nothing."""
    torch.manual_seed(0)
    reference = nn.Sequential(nn.Linear(64, 32)).eval()
    variant = quantize_model(reference, "int8").model
    held = []
    original = compare_module.dequantized_once

    @contextlib.contextmanager
    def spy(model, **kwargs):
        with original(model, **kwargs) as h:
            held.append(h)
            yield h

    monkeypatch.setattr(compare_module, "dequantized_once", spy)
    result = compare_models(reference, {"int8": variant}, torch.randn(4, 64))
    assert result.batches == 1 and result.variants[0].failure is None
    assert len(held) == 1 and held[0].cached == [] and held[0].per_call == ["0"]
