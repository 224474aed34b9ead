"""AWQ's two searches on one layer: the clipping search and the activation-aware scales.

Truth: the ``:mse`` clip search of :mod:`dtypelab.quant.qtensor` (with an identity Hessian AWQ's output
error per block is that block's squared weight error, so the two must pick the same clip and codes);
round to nearest (α = 0 is s = 1); the layer output error computed directly from the inputs.
"""

from __future__ import annotations

import pytest
import torch

from dtypelab.errors import InputError
from dtypelab.formats import get_format
from dtypelab.quant import InputStats, clip_quantize, quantize_tensor, round_trip, search_scales
from dtypelab.quant.awq import channel_scales, rounded, scaled_hessian

SPECS = ["int4:g32", "int4:g32:asym", "int8:channel", "fp8_e4m3", "nvfp4", "nf4:g32", "int3:g32"]


def _layer(rows: int = 48, cols: int = 128, tokens: int = 512, seed: int = 0):
    """A weight and inputs with a few salient channels (AWQ's premise: some inputs are much larger)."""
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, cols, generator=gen) * 0.05
    magnitude = torch.ones(cols)
    magnitude[torch.randperm(cols, generator=gen)[:6]] = 20.0
    inputs = torch.randn(tokens, cols, generator=gen) * magnitude
    stats = InputStats(cols)
    stats.add(inputs)
    return weight, inputs, stats


@pytest.mark.parametrize("spec", SPECS)
def test_clipping_with_identity_hessian_is_the_mse_search(spec):
    weight, _, _ = _layer()
    fmt = get_format(spec)
    clipped = clip_quantize(weight, torch.eye(weight.shape[1]), fmt)
    mse = quantize_tensor(weight, get_format(spec + ":mse"))
    assert torch.equal(clipped.dequantize(), mse.dequantize())


@pytest.mark.parametrize("spec", SPECS)
def test_alpha_zero_is_round_to_nearest(spec):
    weight, _, stats = _layer()
    fmt = get_format(spec)
    found = search_scales([weight], stats.hessian, stats.abs_mean, fmt, grid=(0.0,))
    assert found.alpha == 0.0 and torch.equal(found.scales, torch.ones(weight.shape[1]))
    assert torch.equal(rounded(weight * found.scales, fmt) / found.scales, round_trip(weight, fmt))


@pytest.mark.parametrize("spec", SPECS)
def test_scaled_and_clipped_layer_beats_rtn_on_its_inputs(spec):
    """The α grid holds 0 (RTN) and every clip search holds ratio 1, so on the calibration inputs AWQ's
    output error is at most RTN's; with salient channels it is clearly lower for the coarse formats."""
    weight, inputs, stats = _layer()
    fmt = get_format(spec)
    found = search_scales([weight], stats.hessian, stats.abs_mean, fmt)
    qt = clip_quantize(weight * found.scales, scaled_hessian(stats.hessian, found.scales), fmt)
    effective = qt.dequantize() / found.scales

    def error(candidate):
        return float(((inputs @ (candidate - weight).t()) ** 2).sum())

    assert error(effective) <= error(round_trip(weight, fmt))


def test_salient_channels_get_alpha_above_zero_for_int4():
    weight, _, stats = _layer()
    found = search_scales([weight], stats.hessian, stats.abs_mean, get_format("int4:g32"))
    assert found.alpha > 0


def test_channel_scales_are_normalised_and_finite():
    scales = channel_scales(torch.tensor([0.0, 1.0, 4.0]), 0.5)
    assert torch.isfinite(scales).all()
    assert float(scales.max() * scales.min()) == pytest.approx(1.0)


def test_bad_inputs_are_refused():
    with pytest.raises(InputError, match="does not divide"):
        clip_quantize(torch.randn(4, 48), torch.eye(48), get_format("int4:g32"))
    with pytest.raises(InputError, match="finite"):
        clip_quantize(torch.randn(4, 64), torch.full((64, 64), float("inf")), get_format("int4:g32"))
