"""``int8_matmul`` (issue 16 item 4): W8A8 layers through ``torch._int_mm`` match the emulated path within
float32 rounding, and only while the context is open."""

from __future__ import annotations

import torch
from torch import nn

from dtypelab.quant import QuantizedLinear, int8_matmul, quantize_activations, quantize_model
from dtypelab.quant.nn import _int8_linear

EPS32 = 2.0 ** -24  # float32's unit roundoff


def rounding_bound(layer: QuantizedLinear, x: torch.Tensor) -> torch.Tensor:
    """How far the two paths may be apart per output, from the same codes: the emulation sums `in`
    float32 products (Higham: at most ~(in + 2) u of sum |x_q w|), the kernel sums exactly and rounds
    three times (int32 -> float32, x token scale, x channel scale) plus the bias add: (in + 8) u of
    sum |x_q| |w| + |bias| covers both."""
    xq = quantize_activations(x, "int8").abs()
    w = layer.qtensor.dequantize().abs()
    bias = 0 if layer.bias is None else layer.bias.abs()
    return (layer.in_features + 8) * EPS32 * (xq @ w.t() + bias)


def test_the_kernel_matches_the_emulation_within_float32_rounding():
    torch.manual_seed(0)
    linear = nn.Linear(1536, 384)
    layer = QuantizedLinear(linear, quantize_model(nn.Sequential(linear), "int8:a8").model[0].fmt)
    x = torch.randn(3, 50, 1536) * torch.rand(3, 50, 1) * 4
    with torch.no_grad():
        emulated = layer(x)
        fast = _int8_linear(x, layer.qtensor, layer.bias)
    difference = (fast - emulated).abs()
    bound = rounding_bound(layer, x)
    assert fast.shape == emulated.shape == (3, 50, 384) and fast.dtype == torch.float32
    assert bool((difference <= bound).all())
    assert bool((difference > 0).any())  # two different summations: they do differ, by rounding
    assert float(bound.max() / emulated.abs().max()) < 1e-3  # and the bound is no blank cheque


def test_inside_the_context_only_w8a8_integer_layers_use_the_kernel(monkeypatch):
    torch.manual_seed(0)
    dense = nn.Sequential(nn.Linear(128, 256), nn.GELU(), nn.Linear(256, 64))
    w8a8, w4a8 = quantize_model(dense, "int8:a8").model, quantize_model(dense, "int4:g64:a8").model
    x = torch.randn(4, 9, 128)
    calls = []
    real = torch._int_mm
    monkeypatch.setattr(torch, "_int_mm", lambda a, b: calls.append(a.shape) or real(a, b))
    with torch.no_grad():
        emulated = w8a8(x)
        with int8_matmul(w8a8) as switched, int8_matmul(w4a8) as none:
            fast = w8a8(x)
            w4a8(x)
        after = w8a8(x)
    assert switched == ["0", "2"] and none == []
    assert calls == [(36, 128), (36, 256)]  # the two int8 layers, once each, 4 x 9 tokens
    assert torch.equal(after, emulated)  # emulated again on exit
    for name in switched:
        assert "_int8_matmul" not in dict(w8a8.named_modules())[name].__dict__
    assert not torch.equal(fast, emulated)  # the kernel ran: exact sums, not the emulation's (bound above)
