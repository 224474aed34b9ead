"""The one damage accounting: headroom's prediction, convert's cast report and the quantizer's clip count
count with the same definitions, so they agree on every value (see dtypelab.quant.damage)."""

from __future__ import annotations

import math

import pytest
import torch

from dtypelab.analysis import RangeCounts
from dtypelab.checkpoint import ChunkCaster
from dtypelab.formats import get_format
from dtypelab.quant import (
    TensorDamage,
    count_damage,
    overflow_threshold,
    quantization_damage,
    quantize_tensor,
    round_trip,
    saturated_count,
    sqnr_from_powers,
)
from dtypelab.quant.damage import sum_of_squares

PLAIN = ["fp16", "bf16", "fp8_e4m3:cast"]


def adversarial(fmt_name: str, n: int = 5000) -> torch.Tensor:
    """Values in every regime of the format: overflow, the rounding threshold and its neighbours,
    normals, subnormals, flush-to-zero, zeros, inf and NaN."""
    fmt = get_format(fmt_name)
    torch.manual_seed(0)
    top, tiny = fmt.max_finite, fmt.smallest_subnormal
    limit = overflow_threshold(fmt)
    edges = torch.tensor([0.0, -0.0, math.inf, -math.inf, math.nan, top, -top, limit,
                          math.nextafter(limit, math.inf), math.nextafter(limit, 0), tiny, tiny / 2, tiny / 4,
                          fmt.smallest_normal, 3 * top, -3 * top])
    exponents = torch.empty(n).uniform_(math.log2(tiny) - 3, math.log2(top) + 2)
    spread = torch.sign(torch.randn(n)) * torch.exp2(exponents)
    return torch.cat([edges, spread]).float()


def caster_damage(fmt_name: str, values: torch.Tensor) -> TensorDamage:
    caster = ChunkCaster(get_format(fmt_name), chunk_elements=values.numel())
    raw = values.numpy().tobytes()
    caster.raw[:len(raw)] = raw
    return caster.cast(torch.float32, values.numel())[1]


@pytest.mark.parametrize("name", PLAIN)
def test_headroom_convert_and_count_damage_agree_on_every_regime(name):
    fmt, values = get_format(name), adversarial(name)
    counts = count_damage(values, round_trip(values, fmt), fmt)
    predicted = RangeCounts()
    predicted.add_values(values, fmt)
    written = caster_damage(name, values)
    assert (predicted.overflowed, predicted.flushed_to_zero, predicted.subnormal) == \
        (counts.overflowed, counts.flushed_to_zero, counts.subnormal)
    assert (written.overflowed, written.flushed_to_zero, written.subnormal) == \
        (counts.overflowed, counts.flushed_to_zero, counts.subnormal)
    assert written.max_rel_error == counts.max_rel_error
    assert counts.overflowed > 0 and counts.flushed_to_zero > 0 and counts.subnormal > 0  # every regime seen


@pytest.mark.parametrize("name", PLAIN)
def test_counts_match_an_independent_element_by_element_truth(name):
    fmt, values = get_format(name), adversarial(name, 500)
    stored = round_trip(values, fmt)
    counts = count_damage(values, stored, fmt)
    overflowed = flushed = subnormal = 0
    for x, s in zip(values.tolist(), stored.tolist(), strict=True):  # the module docstring's definitions
        if math.isfinite(x) and (not math.isfinite(s) or abs(x) > overflow_threshold(fmt)):
            overflowed += 1
        overflowed += math.isinf(x) and math.isfinite(s)  # e4m3fn has no inf: ±448 stands for it
        flushed += x != 0 and s == 0  # NaN != 0 holds and a NaN stays NaN: never counted
        subnormal += 0 < abs(s) < fmt.smallest_normal
    assert (counts.overflowed, counts.flushed_to_zero, counts.subnormal) == (overflowed, flushed, subnormal)
    assert counts.non_finite == int((~values.isfinite()).sum()) and counts.numel == values.numel()


def test_e4m3_threshold_is_half_the_top_step_past_448():
    assert overflow_threshold(get_format("fp8_e4m3:cast")) == 464.0
    assert overflow_threshold(get_format("fp16")) == 65520.0


def test_sqnr_of_the_damage_is_the_compare_formula():
    values = torch.linspace(-3, 3, 101)
    fmt = get_format("bf16")
    stored = round_trip(values, fmt)
    counts = count_damage(values, stored, fmt)
    signal = float(values.double().pow(2).sum())
    noise = float((stored.double() - values.double()).pow(2).sum())
    assert counts.sqnr_db == pytest.approx(10 * math.log10(signal / noise), rel=1e-12)
    assert sqnr_from_powers(1.0, 0.0) == math.inf and sqnr_from_powers(0.0, 1.0) == -math.inf


def test_quantized_damage_sqnr_and_cast_damage_share_one_formula():
    torch.manual_seed(1)
    weight = torch.randn(64, 128)
    qt = quantize_tensor(weight, get_format("int4:g32"))
    damage = quantization_damage(weight, qt)
    noise = float((qt.dequantize(torch.float32).double() - weight.double()).pow(2).sum())
    assert damage.sqnr_db == pytest.approx(sqnr_from_powers(float(weight.double().pow(2).sum()), noise),
                                           rel=1e-5)  # float32 dot products per chunk, float64 across


def test_an_inf_a_format_without_inf_saturates_is_an_overflow():
    """e4m3fn stores ±inf as ±448: the value is lost, so it counts as overflowed (``--strict`` refuses
    it), in count_damage and in convert's chunk caster alike; fp16 keeps inf as inf: nothing lost."""
    values = torch.tensor([math.inf, -math.inf, 1.0, math.nan, 0.5])
    fmt = get_format("fp8_e4m3:cast")
    stored = round_trip(values, fmt)
    assert stored[:2].tolist() == [448.0, -448.0]
    assert count_damage(values, stored, fmt).overflowed == 2
    assert caster_damage("fp8_e4m3:cast", values).overflowed == 2
    assert caster_damage("fp8_e4m3:cast", values).lost_values == 2
    fp16 = get_format("fp16")
    assert count_damage(values, round_trip(values, fp16), fp16).overflowed == 0
    assert caster_damage("fp16", values).overflowed == 0


def test_sqnr_of_weights_whose_squares_pass_float32s_range_is_finite_and_exact():
    """|w| near 1e20: w² is past float32's 3.4e38, so float32 sums are inf and the SQNR was inf (or NaN).
    By hand: int8 per tensor, signed scale -absmax/128 = -2^60 exactly, so 128s, -64s and s are stored
    exactly and 0.25s rounds to code 0: signal (128² + 64² + 1 + 1/16)s², noise (s/4)²."""
    s = 2.0 ** 60
    weight = torch.tensor([[128 * s, -64 * s, s, 0.25 * s]])
    damage = quantization_damage(weight, quantize_tensor(weight, get_format("int8:tensor")))
    expected_db = 10 * math.log10((128**2 + 64**2 + 1 + 1 / 16) / (1 / 16))  # 55.155 dB
    assert math.isfinite(damage.sqnr_db)
    assert damage.sqnr_db == pytest.approx(expected_db, rel=1e-12)  # every term exact in float64
    assert damage.signal_sq == (128**2 + 64**2 + 1 + 1 / 16) * s * s


def test_sum_of_squares_takes_float64_only_where_float32_cannot_hold_it():
    big = torch.full((4,), 1e20)
    assert sum_of_squares(big) == pytest.approx(4e40, rel=1e-6)  # float32: inf
    tiny = torch.full((4,), 1e-25)
    assert sum_of_squares(tiny) == pytest.approx(4e-50, rel=1e-6)  # float32: 0
    assert sum_of_squares(torch.tensor([3.0, 4.0])) == 25.0
    assert sum_of_squares(torch.tensor([])) == 0.0


QUANTIZED = ["int8", "int8:tensor", "int4:g128", "int4:g32:asym", "int4:channel:sfp32", "int3:g64",
             "int2:g64:asym", "nf4", "mxfp4", "mxfp8", "nvfp4", "fp8_e4m3", "fp8_e5m2:tensor",
             "int4:g128:mse", "int4:g32:asym:mse", "fp8_e4m3:mse"]


def weights_with_every_case(rows: int = 96, cols: int = 256) -> torch.Tensor:
    """Gaussian weights with what the counts must see: exact zeros (a zero row too), subnormals, values
    that flush to zero beside a block's outlier, ties of +m and -m in a block, and an outlier row."""
    torch.manual_seed(3)
    weight = torch.randn(rows, cols) * 0.02
    weight[0] = 0.0  # an all-zero row: every block scale 1
    weight[1, ::5] = 0.0  # scattered zeros
    weight[2, :8] = torch.tensor([1e-40, -3e-42, 1e-39, 0.0, 5e-45, -1e-38, 1e-30, -1e-35])  # subnormals
    weight[3, 7], weight[3, 40] = 0.5, -0.5  # +m and -m in one block
    weight[4] *= 1e4  # an outlier row
    weight[5, ::16] = 30.0  # one outlier per block of 16: the rest flush in coarse formats
    weight[6] *= 5e7  # ~1e6: past what an fp16 scale reaches (65504 x 8), so unclipped scales saturate
    return weight


def truth(source: torch.Tensor, qt) -> tuple:
    """The module docstring's definitions element by element, in float64: (flushed, max relative error
    over non-zero values, signal, noise)."""
    x, s = source.double().reshape(-1), qt.dequantize(torch.float32).double().reshape(-1)
    flushed = int(((x != 0) & (s == 0)).sum())
    nonzero = x != 0
    max_rel = float(((s - x).abs()[nonzero] / x.abs()[nonzero]).max())
    return flushed, max_rel, float((x * x).sum()), float(((s - x) ** 2).sum())


@pytest.mark.parametrize("spec", QUANTIZED)
def test_counting_on_the_way_equals_counting_the_finished_tensor(spec):
    """quantize_counted (the stored values from the quantizer's float codes, convert's path) gives the
    codes of quantize_tensor bit for bit and the damage quantization_damage counts from them, field for
    field; and both agree with an element-by-element truth."""
    from dtypelab.quant import quantize_counted

    fmt, weight = get_format(spec), weights_with_every_case()
    qt, counted = quantize_counted(weight, fmt)
    reference = quantize_tensor(weight, fmt)
    for part in ("data", "scale", "zero_point", "tensor_scale"):
        mine, theirs = getattr(qt, part), getattr(reference, part)
        assert (mine is None) == (theirs is None)
        if mine is not None:
            assert mine.dtype == theirs.dtype
            assert torch.equal(mine.view(torch.uint8), theirs.view(torch.uint8))
    assert counted == quantization_damage(weight, reference)
    flushed, max_rel, signal, noise = truth(weight, qt)
    assert counted.flushed_to_zero == flushed and counted.flushed_to_zero > 0
    assert counted.max_rel_error == pytest.approx(max_rel, rel=1e-6)  # a float32 quotient, 2^-24 apart
    assert counted.signal_sq == pytest.approx(signal, rel=1e-5)  # float32 dots per call (sum_of_squares)
    assert counted.noise_sq == pytest.approx(noise, rel=1e-5)
    assert counted.overflowed == saturated_count(weight, reference)
    if spec in ("int4:g128", "int4:g128:mse", "nf4"):  # fp16 scales: row 6 saturates (the proof fails)
        assert counted.overflowed > 0


def test_a_workspace_reused_across_tensors_of_other_shapes_and_dtypes_changes_nothing():
    from dtypelab.quant import Workspace, quantize_counted

    workspace, fmt = Workspace(), get_format("int4:g32:asym")
    torch.manual_seed(4)
    tensors = [torch.randn(64, 256), torch.randn(8, 64).bfloat16(), torch.randn(128, 128).half(),
               torch.randn(3, 32), torch.randn(96, 64).t()]  # the last one not contiguous (a Conv1D's)
    for tensor in tensors * 2:  # big, small, big again: stale buffer contents must not leak in
        qt, damage = quantize_counted(tensor, fmt, workspace)
        fresh_qt, fresh = quantize_counted(tensor, fmt)
        assert torch.equal(qt.data, fresh_qt.data) and torch.equal(qt.scale, fresh_qt.scale)
        assert damage == fresh == quantization_damage(tensor, fresh_qt)


def test_the_source_is_never_written():
    from dtypelab.quant import quantize_counted

    weight = weights_with_every_case()
    before = weight.clone()
    quantize_counted(weight, get_format("int4:g128"))
    assert torch.equal(weight, before)


def test_a_zero_row_and_a_flush_counted_by_hand():
    """By hand, int8 per channel (signed scale extreme / -128): the zero row keeps scale 1 and loses
    nothing (its 0 / 0 relative errors count 0); [4, -2, 0.01, 0] takes scale 4 / -128 = -1/32, which
    stores 4 and -2 exactly (codes -128, 64) and 0.01 as code 0 (-0.32 rounds to 0): one flush, relative
    error 1, noise 0.01²."""
    from dtypelab.quant import quantize_counted

    weight = torch.zeros(2, 4)
    weight[1] = torch.tensor([4.0, -2.0, 0.01, 0.0])  # scale 4 / -128 = -1/32: 0.01 -> code 0, flushed
    _, damage = quantize_counted(weight, get_format("int8"))
    assert damage.flushed_to_zero == 1 and damage.max_rel_error == 1.0 and damage.overflowed == 0
    assert damage.noise_sq == pytest.approx(0.01 ** 2, rel=1e-6)


def test_count_nonzero_equals_torchs_count():
    from dtypelab.quant.damage import count_nonzero

    torch.manual_seed(5)
    values = torch.randn(10_000)
    values[torch.rand(10_000) < 0.3] = 0.0
    values[:3] = torch.tensor([-0.0, 1e-45, -1e-40])  # -0 is zero; subnormals are not
    for tensor in (values, values.double(), values[:0], values.half()):
        assert count_nonzero(tensor) == int(torch.count_nonzero(tensor))
    assert count_nonzero(values, torch.empty(20_000)) == int(torch.count_nonzero(values))


def test_a_flushed_subnormal_counts_a_relative_error_of_1_as_a_cast_does():
    """The relative error is |stored - x| / |x| for every non-zero x, subnormals too: a subnormal weight
    stored as 0 lost all of itself (the quantized count once divided by max(|x|, 2^-126), which made that
    loss read 0.0085), the same rule count_damage applies to a cast."""
    from dtypelab.quant import quantize_counted

    weight = torch.tensor([[1.0, 0.5, -0.25, 1e-40]])  # e4m3 per channel: 1e-40 / (1 / 448) rounds to 0
    qt, counted = quantize_counted(weight, get_format("fp8_e4m3"))
    assert counted.flushed_to_zero == 1 and counted.max_rel_error == 1.0
    assert quantization_damage(weight, qt).max_rel_error == 1.0
    fp16 = get_format("fp16")
    cast = count_damage(weight.reshape(-1), round_trip(weight.reshape(-1), fp16), fp16)
    assert cast.flushed_to_zero == 1 and cast.max_rel_error == 1.0
