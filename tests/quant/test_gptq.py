"""GPTQ on one layer: against round to nearest, a slow column-by-column reference, and bad Hessians.

Truth: round to nearest (``round_trip``) where GPTQ has nothing to push errors onto (identity Hessian);
a straightforward implementation of the paper's algorithm (no lazy blocks, one column at a time) written
here; the layer output error ``tr(ΔW H ΔWᵀ)`` computed directly from the calibration inputs.
"""

from __future__ import annotations

import pytest
import torch

from dtypelab.errors import InputError
from dtypelab.formats import Granularity, get_format
from dtypelab.quant import InputStats, gptq_quantize, round_trip
from dtypelab.quant.gptq import inverse_cholesky_upper
from dtypelab.quant.qtensor import _choose_scales, _decoded_scale, _tensor_scale

SPECS = ["int4:g32:gptq", "int4:g32:asym:gptq", "int8:channel:gptq", "fp8_e4m3:gptq", "mxfp4:gptq",
         "nvfp4:gptq", "nf4:g32:gptq", "int4:g32:mse:gptq", "int3:g32:gptq", "int2:g32:asym:gptq"]


def _layer(rows: int = 48, cols: int = 128, tokens: int = 512, seed: int = 0):
    """A weight and correlated calibration inputs (a low-rank mix plus noise, as real activations are)."""
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, cols, generator=gen) * 0.05
    mix = torch.randn(16, cols, generator=gen)
    inputs = torch.randn(tokens, 16, generator=gen) @ mix + 0.3 * torch.randn(tokens, cols, generator=gen)
    return weight, inputs


def _hessian(inputs: torch.Tensor) -> torch.Tensor:
    stats = InputStats(inputs.shape[1])
    stats.add(inputs)
    return stats.hessian


def _output_error(weight, candidate, inputs) -> float:
    return float(((inputs @ (candidate - weight).t()) ** 2).sum())


@pytest.mark.parametrize("spec", SPECS)
def test_identity_hessian_is_round_to_nearest(spec):
    """With H = I there is no correlation to push errors onto: every column rounds as RTN does."""
    fmt = get_format(spec)
    weight, _ = _layer()
    result = gptq_quantize(weight, torch.eye(weight.shape[1]), fmt)
    plain = get_format(spec.removesuffix(":gptq"))
    assert torch.equal(result.qtensor.dequantize(), round_trip(weight, plain))


@pytest.mark.parametrize("spec", SPECS)
def test_output_error_on_calibration_inputs_at_most_rtn(spec):
    fmt = get_format(spec)
    weight, inputs = _layer()
    result = gptq_quantize(weight, _hessian(inputs), fmt)
    plain = get_format(spec.removesuffix(":gptq"))
    gptq_error = _output_error(weight, result.qtensor.dequantize(), inputs)
    assert gptq_error <= _output_error(weight, round_trip(weight, plain), inputs)


def _slow_gptq(weight: torch.Tensor, hessian: torch.Tensor, fmt) -> torch.Tensor:
    """The algorithm as the paper states it: every column quantized in order, its error propagated to
    all later columns at once; group scales from the updated weights when a group begins."""
    w = weight.clone().float()
    h = hessian.clone()
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0
    upper, _ = inverse_cholesky_upper(h)
    rows, cols = w.shape
    group = fmt.group_size if fmt.granularity == Granularity.GROUP else cols
    tensor_scale = _tensor_scale(w, fmt)
    out = torch.zeros_like(w)
    for i in range(cols):
        if i % group == 0:
            scale, zp = _choose_scales(w[:, i:i + group].reshape(rows, 1, group), fmt, tensor_scale)
            step = _decoded_scale(scale, tensor_scale)
        column, zero = w[:, i].reshape(rows, 1, 1), zp.float() if zp is not None else 0
        codes = fmt.element_codec.decode(fmt.element_codec.encode(column / step + zero))
        q = ((codes.reshape(rows, 1, 1) - zero) * step).reshape(rows)
        out[:, i] = q
        error = (w[:, i] - q) / upper[i, i]
        w[:, i:] -= torch.outer(error, upper[i, i:])
    return out


@pytest.mark.parametrize("spec", ["int4:g32:gptq", "int4:g32:asym:gptq", "int8:channel:gptq"])
@pytest.mark.parametrize("block_size", [128, 16, 48])
def test_matches_slow_reference(spec, block_size):
    """Lazy blocks change only the order of float32 additions: a code may flip only where a value lies
    within float32 rounding of a decision boundary, which these 6k elements never hit (measured: 0);
    the values must agree to the format's smallest step times float32's epsilon elsewhere."""
    fmt = get_format(spec)
    weight, inputs = _layer()
    hessian = _hessian(inputs)
    fast = gptq_quantize(weight, hessian, fmt, block_size=block_size).qtensor.dequantize()
    slow = _slow_gptq(weight, hessian, fmt)
    differ = (fast - slow).abs() > 1e-6 * weight.abs().max()
    assert int(differ.sum()) <= weight.numel() // 1000


def test_dead_inputs_zero_their_columns_and_stay_finite():
    weight, inputs = _layer()
    inputs[:, [3, 70]] = 0
    result = gptq_quantize(weight, _hessian(inputs), get_format("int4:g32:gptq"))
    values = result.qtensor.dequantize()
    assert result.dead_inputs == 2
    assert torch.isfinite(values).all()
    assert torch.equal(values[:, [3, 70]], torch.zeros(weight.shape[0], 2))


def test_an_indefinite_hessian_is_refused_in_one_line():
    hessian = torch.eye(64)
    hessian[0, 1] = hessian[1, 0] = 1e4  # no damping up to 10 x mean diagonal makes this positive definite
    with pytest.raises(InputError, match="singular even with damping"):
        gptq_quantize(torch.randn(8, 64), hessian, get_format("int4:g32:gptq"))


def test_damping_is_raised_and_reported_when_needed():
    hessian = torch.eye(64)
    hessian[0, 1] = hessian[1, 0] = 1.5  # smallest eigenvalue -0.5: damping 0.01 and 0.1 fail, 1.0 holds
    result = gptq_quantize(torch.randn(8, 64), hessian, get_format("int4:g32:gptq"))
    assert result.damp_ratio == pytest.approx(1.0)


def test_non_finite_inputs_and_bad_shapes_are_refused():
    weight = torch.randn(8, 64)
    with pytest.raises(InputError, match="NaN or inf"):
        gptq_quantize(weight, torch.full((64, 64), float("nan")), get_format("int4:g32:gptq"))
    with pytest.raises(InputError, match="Hessian"):
        gptq_quantize(weight, torch.eye(32), get_format("int4:g32:gptq"))
    with pytest.raises(InputError, match="does not divide"):
        gptq_quantize(torch.randn(8, 48), torch.eye(48), get_format("int4:g32:gptq"))
