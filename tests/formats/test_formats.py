"""The format registry, spec grammar and element codecs against independent truth.

Truth: torch's own float8 casts and finfo, ml_dtypes' float4_e2m1fn / float8_e8m0fnu, numpy's
round-half-to-even, and hand-computed cases. Every code of every format of 8 bits or less is checked.
"""

from __future__ import annotations

import json
import math

import ml_dtypes
import numpy as np
import pytest
import torch

from dtypelab.errors import UnknownFormatError
from dtypelab.formats import (
    E2M1,
    E4M3,
    E5M2,
    E8M0,
    GRAMMAR,
    INT4,
    INT8,
    NF4,
    UINT4,
    UINT8,
    FloatCodec,
    IntCodec,
    all_formats,
    format_table,
    get_format,
    parse_format_list,
)
from dtypelab.formats.codecs import nearest_index
from dtypelab.quant import round_trip
from helpers import run_cli

TORCH_CODECS = [(E4M3, torch.float8_e4m3fn), (E5M2, torch.float8_e5m2), (E8M0, torch.float8_e8m0fnu)]
ML_CODECS = [(E2M1, ml_dtypes.float4_e2m1fn), (E8M0, ml_dtypes.float8_e8m0fnu),
             (E4M3, ml_dtypes.float8_e4m3fn), (E5M2, ml_dtypes.float8_e5m2)]
ALL_CODECS = [E4M3, E5M2, E2M1, E8M0, INT8, INT4, UINT8, UINT4, NF4]


def _ids(params):
    return [(p[0] if isinstance(p, tuple) else p).kind for p in params]


def _seeded() -> torch.Generator:
    """Random probes drawn the same way on every run, so a failure can be reproduced."""
    return torch.Generator().manual_seed(0)


def _all_codes(codec) -> torch.Tensor:
    return torch.arange(1 << codec.bits, dtype=torch.int64)


def _neighbour_probes(codec) -> torch.Tensor:
    """Every finite value, every midpoint between neighbours and the float32 just either side of it."""
    values = codec.values()
    finite = torch.unique(values[torch.isfinite(values)]).double()
    mids = (finite[:-1] + finite[1:]) / 2
    top = torch.tensor([finite[-1].item() * 1.0625, finite[-1].item() * 1.1, 1e30, math.inf])
    probes = torch.cat([finite, mids, top, -top]).float()
    probes = torch.cat([probes, torch.nextafter(probes, torch.tensor(math.inf)),
                        torch.nextafter(probes, torch.tensor(-math.inf))])
    return probes[torch.isfinite(probes) | torch.isinf(probes)]


@pytest.mark.parametrize(("codec", "dtype"), TORCH_CODECS, ids=_ids(TORCH_CODECS))
def test_decode_every_code_equals_torch(codec, dtype):
    codes = _all_codes(codec).to(torch.uint8)
    expected = codes.view(dtype).float()
    got = codec.decode(codes)
    assert torch.equal(got.isnan(), expected.isnan())
    assert torch.equal(got.nan_to_num(0.0), expected.nan_to_num(0.0))
    assert torch.equal(torch.signbit(got[~got.isnan()]), torch.signbit(expected[~expected.isnan()]))


@pytest.mark.parametrize(("codec", "dtype"), ML_CODECS, ids=_ids(ML_CODECS))
def test_decode_every_code_equals_ml_dtypes(codec, dtype):
    codes = np.arange(1 << codec.bits, dtype=np.uint8)
    expected = torch.from_numpy(codes.view(dtype).astype(np.float32))
    got = codec.decode(torch.from_numpy(codes))
    assert torch.equal(got.isnan(), expected.isnan())
    assert torch.equal(got.nan_to_num(0.0), expected.nan_to_num(0.0))


@pytest.mark.parametrize(("codec", "dtype"), TORCH_CODECS[:2], ids=["e4m3", "e5m2"])
def test_fp8_encode_equals_torch_cast_bit_for_bit(codec, dtype):
    probes = torch.cat([_neighbour_probes(codec), torch.randn(100_000, generator=_seeded()) * 50,
                        torch.tensor([math.nan, -math.nan, 0.0, -0.0])])
    assert torch.equal(codec.encode(probes), probes.to(dtype).view(torch.uint8))


@pytest.mark.parametrize(("codec", "dtype"), [(E2M1, ml_dtypes.float4_e2m1fn),
                                              (E8M0, ml_dtypes.float8_e8m0fnu)], ids=["e2m1", "e8m0"])
def test_encode_equals_ml_dtypes(codec, dtype):
    """NaN is left out for e2m1: it has no NaN code (ml_dtypes picks -0); quantize refuses NaN first.

    Also left out: float32 *subnormal* inputs other than exact e8m0 values (below 2^-126). ml_dtypes and
    torch both round those by bit pattern (2^-127 + 2^-149 becomes 2^-126); we round by value. Scales
    never get there: MX scales are computed as exact powers of two.
    """
    probes = torch.cat([_neighbour_probes(codec), torch.randn(10_000, generator=_seeded()) * 4,
                        torch.tensor([0.0, -0.0])])
    f32_subnormal = (probes.abs() < torch.finfo(torch.float32).tiny) & (probes != 0)
    probes = probes[~f32_subnormal | torch.isin(probes, codec.values())]
    if codec.has_nan:
        probes = torch.cat([probes, torch.tensor([math.nan])])
    expected = probes.numpy().astype(dtype).view(np.uint8)
    assert np.array_equal(codec.encode(probes).numpy(), expected)


@pytest.mark.parametrize("codec", ALL_CODECS, ids=_ids(ALL_CODECS))
def test_every_finite_code_round_trips(codec):
    codes = _all_codes(codec)
    values = codec.decode(codes)
    kept = torch.isfinite(values) & (values >= codec.min_value if isinstance(codec, IntCodec) else True)
    encoded = codec.encode(values[kept]).long() & ((1 << codec.bits) - 1)
    assert torch.equal(encoded, codes[kept])


@pytest.mark.parametrize("codec", [INT8, INT4, UINT8, UINT4], ids=_ids([INT8, INT4, UINT8, UINT4]))
def test_int_encode_is_numpy_round_half_even_then_clamp(codec):
    x = np.arange(-300, 300, dtype=np.float32) / 2  # every half-integer tie in range and beyond
    expected = np.clip(np.round(x), codec.min_value, codec.max_finite)  # np.round: half to even
    assert np.array_equal(codec.encode(torch.from_numpy(x)).numpy(), expected)


def test_int_decode_is_twos_complement():
    codes = torch.arange(256)
    assert torch.equal(INT8.decode(codes), codes.to(torch.uint8).view(torch.int8).float())
    assert INT4.decode(torch.tensor([7, 8, 15])).tolist() == [7.0, -8.0, -1.0]


def test_nf4_encode_picks_a_nearest_entry_and_ends_clamp():
    x = torch.linspace(-1.2, 1.2, 20_001)
    table = torch.tensor(NF4.table)
    best = (x[:, None] - table[None, :]).abs().min(dim=1).values  # brute force over all 16 entries
    assert torch.equal((x - NF4.decode(NF4.encode(x))).abs(), best)
    assert NF4.encode(torch.tensor([-5.0, 5.0])).tolist() == [0, 15]


def test_nearest_index_ties_up_rule():
    grid = torch.tensor([1.0, 2.0, 4.0], dtype=torch.float64)
    assert nearest_index(torch.tensor([1.5, 3.0]), grid, "up").tolist() == [1, 2]
    assert nearest_index(torch.tensor([1.5, 3.0]), grid, "even").tolist() == [0, 2]


@pytest.mark.parametrize(("codec", "dtype"), [(E4M3, torch.float8_e4m3fn), (E5M2, torch.float8_e5m2),
                                              (E8M0, torch.float8_e8m0fnu)], ids=["e4m3", "e5m2", "e8m0"])
def test_codec_figures_equal_torch_finfo(codec, dtype):
    finfo = torch.finfo(dtype)
    assert codec.max_finite == finfo.max
    assert codec.smallest_normal == finfo.smallest_normal
    assert codec.eps == finfo.eps


@pytest.mark.parametrize(("codec", "dtype"), [
    (E2M1, ml_dtypes.float4_e2m1fn), (E8M0, ml_dtypes.float8_e8m0fnu), (E4M3, ml_dtypes.float8_e4m3fn)],
    ids=["e2m1", "e8m0", "e4m3"])
def test_codec_figures_equal_ml_dtypes_finfo(codec, dtype):
    finfo = ml_dtypes.finfo(dtype)
    assert codec.max_finite == float(finfo.max)
    assert codec.smallest_normal == float(finfo.smallest_normal)
    assert codec.smallest_subnormal == float(finfo.smallest_subnormal)
    assert codec.eps == float(finfo.eps)


def test_inf_nan_behaviour_flags():
    assert (E5M2.has_inf, E5M2.has_nan) == (True, True)
    assert (E4M3.has_inf, E4M3.has_nan) == (False, True)
    assert (E2M1.has_inf, E2M1.has_nan) == (False, False)
    assert (E8M0.has_inf, E8M0.has_nan) == (False, True)


@pytest.mark.parametrize("fmt", all_formats(), ids=lambda f: f.name)
def test_every_registry_entry_resolves_by_all_its_names(fmt):
    for name in (fmt.name, *fmt.aliases):
        assert get_format(name) is fmt
        assert get_format(name.upper()) is fmt


@pytest.mark.parametrize("fmt", [f for f in all_formats() if f.torch_dtype is not None
                                 and f.torch_dtype.is_floating_point], ids=lambda f: f.name)
def test_figures_of_torch_backed_formats_equal_finfo(fmt):
    finfo = torch.finfo(fmt.torch_dtype)
    assert fmt.max_finite == finfo.max
    assert fmt.smallest_normal == finfo.smallest_normal
    assert fmt.eps == finfo.eps
    bits_dtype = {1: torch.uint8, 2: torch.int16, 4: torch.int32}[fmt.torch_dtype.itemsize]
    assert fmt.smallest_subnormal == torch.tensor(1, dtype=bits_dtype).view(fmt.torch_dtype).item()  # code 1


@pytest.mark.parametrize("name", ["fp32", "fp16", "bf16"])
def test_plain_round_trip_is_torch_cast(name):
    x = torch.randn(1000, generator=_seeded()) * 1000
    fmt = get_format(name)
    assert torch.equal(round_trip(x, fmt), x.to(fmt.torch_dtype).float())


@pytest.mark.parametrize(("spec", "bits"), [
    ("int4:g128", 4 + 16 / 128), ("int4:g64:asym", 4 + (16 + 8) / 64), ("mxfp4", 4 + 8 / 32),
    ("mxfp8", 8 + 8 / 32), ("nvfp4", 4 + 8 / 16), ("nf4", 4 + 16 / 64), ("int8:g32", 8 + 32 / 32),
    ("int8:g32:sfp16", 8 + 16 / 32), ("int4:g64:sbf16:asym", 4 + (16 + 8) / 64)])
def test_effective_bits_hand_computed(spec, bits):
    assert get_format(spec).effective_bits() == bits


def test_channel_effective_bits_depend_on_row_length():
    assert get_format("int8:channel").effective_bits(256) == 8 + 32 / 256


@pytest.mark.parametrize(("spec", "name"), [
    ("int4", "int4"), ("INT4:G128", "int4:g128"), ("int4:asym:g64", "int4:g64:asym"),
    ("fp8_e4m3:tensor", "fp8_e4m3:tensor"), ("float8_e4m3fn:channel", "fp8_e4m3:channel"),
    ("int8:a8", "int8:channel:a8"), ("int4:g128:mse", "int4:g128:mse"), ("nvfp4:afp8", "nvfp4:afp8"),
    ("int8:sfp16", "int8:channel:sfp16"), ("int8:sfp32", "int8:channel"), ("int4:sfp32", "int4:g128:sfp32")])
def test_spec_canonical_names(spec, name):
    assert get_format(spec).name == name
    assert get_format(get_format(spec).name) == get_format(spec)


def test_repeating_an_option_is_not_a_conflict():
    assert get_format("int4:g64:g64") == get_format("int4:g64")


def test_spec_sets_fields():
    fmt = get_format("int4:g64:asym:mse:a8")
    assert (fmt.granularity, fmt.group_size, fmt.symmetric, fmt.scale_search, fmt.activations) == \
        ("group", 64, False, "mse", "int8")


@pytest.mark.parametrize(("spec", "needle"), [
    ("int5", "unknown dtype or format"), ("int4:g", "unknown option"), ("int4:foo", "unknown option"),
    ("fp16:g128", "plain torch dtype"), ("mxfp4:g64", "fixed block"), ("fp8_e4m3:asym", "symmetric only"),
    ("int4:g1", "at least 2"), ("", "unknown dtype"), ("mxfp4:sfp16", "fixes its scale format"),
    ("int4:g64:g128", "'g64' and 'g128' both set the granularity"),
    ("int4:tensor:g64", "both set the granularity"), ("int8:a8:afp8", "both set the activations"),
    ("int4:sym:asym", "both set the symmetric"), ("int4:mse:absmax", "both set the scale_search")])
def test_bad_specs_name_the_problem_the_grammar_and_names(spec, needle):
    with pytest.raises(UnknownFormatError) as info:
        get_format(spec)
    message = str(info.value)
    assert needle in message
    assert GRAMMAR in message
    if needle == "unknown dtype or format":
        assert "nvfp4" in message and "int4" in message


def test_parse_format_list():
    assert [f.name for f in parse_format_list("bf16, int4:g128,mxfp4")] == ["bf16", "int4:g128", "mxfp4"]
    with pytest.raises(UnknownFormatError, match="empty item"):
        parse_format_list("fp16,,bf16")


def test_e8m0_has_no_zero_and_no_sign():
    codec = FloatCodec(8, 0, 127, signed=False, subnormals=False, overflow="nan", ties="up")
    assert codec == E8M0
    assert E8M0.encode(torch.tensor([0.0, -1.0, 1.0, 3.0])).tolist() == [255, 255, 127, 129]


def test_format_table_rows_carry_registry_figures():
    rows = {row.name: row for row in format_table().formats}
    assert list(rows) == [f.name for f in all_formats()]
    assert rows["bf16"].max_finite == torch.finfo(torch.bfloat16).max
    assert (rows["int4"].effective_bits, rows["int4"].scale, rows["int4"].block) == (4.125, "fp16", 128)
    assert (rows["int8"].granularity, rows["int8"].block) == ("channel", None)  # a number or null, never text
    nvfp4 = rows["nvfp4"]
    assert (nvfp4.element, nvfp4.scale, nvfp4.max_finite) == ("e2m1", "e4m3+fp32", 6.0)
    assert (rows["fp8_e5m2"].inf, rows["fp8_e4m3"].inf, rows["mxfp4"].nan) == (True, False, False)


def test_asym_rows_show_unsigned_elements():
    row = format_table(["int4:g64:asym"]).formats[0]
    assert (row.element, row.max_finite, row.scale) == ("uint4", 15.0, "fp16+zp")


_cli = run_cli


def test_formats_command_text_and_json(capsys):
    code, out, _ = _cli(capsys, "formats", "--columns", "all")  # unwrapped: the grammar on one line
    assert code == 0 and "Number formats" in out and "nvfp4" in out and GRAMMAR in out
    code, out, _ = _cli(capsys, "formats", "int4:g64:asym,mxfp4", "--json")
    data = json.loads(out)
    assert code == 0 and [r["name"] for r in data["formats"]] == ["int4:g64:asym", "mxfp4"]
    assert data["formats"][1]["effective_bits"] == 4.25


def test_formats_command_bad_spec_is_one_line_exit_2(capsys):
    code, out, err = _cli(capsys, "formats", "int4:g")
    assert code == 2 and out == "" and "unknown option 'g'" in err and len(err.strip().splitlines()) == 1


def test_raw_castable_formats_are_torch_floats_without_a_scale():
    castable = [f.name for f in all_formats() if f.raw_castable]
    assert castable == ["fp32", "fp16", "bf16"]  # fp8 entries carry a scale unless :cast
    assert get_format("fp8_e4m3:cast").raw_castable and get_format("fp8_e5m2:cast").raw_castable
    assert not get_format("fp8_e4m3:cast").is_quantized


@pytest.mark.parametrize("spec", ["fp8_e4m3:cast", "fp8_e5m2:cast"])
def test_cast_option_round_trips_like_torch_cast(spec):
    fmt = get_format(spec)
    values = torch.tensor([1000.0, 1.1, -600.0, 3e-5, 0.0])
    # e4m3fn has no inf: the stored cast saturates at 448 (as convert writes it); e5m2 overflows to inf
    expected = values.clamp(-448, 448) if fmt.codec.overflow == "saturate" else values
    assert torch.equal(round_trip(values, fmt), expected.to(fmt.torch_dtype).float())
    assert fmt.effective_bits() == 8 and fmt.name == spec


@pytest.mark.parametrize("spec", ["int8:cast", "mxfp8:cast", "bf16:cast", "fp8_e4m3:cast:sfp16",
                                  "fp8_e4m3:cast:afp8"])
def test_cast_option_refused_where_it_means_nothing(spec):
    with pytest.raises(UnknownFormatError, match="cast|plain torch dtype"):
        get_format(spec)


@pytest.mark.parametrize("spec", ["int4:g32", "nf4:g32", "mxfp4", "int8:g32:asym"])
def test_round_trip_of_a_row_the_group_does_not_divide(spec):
    """40 = 32 + 8: the padded tail block holds 8 values and zeros, which change no absmax (and no
    min / max for asym, since its range includes 0), so it rounds like a block of those 8 alone."""
    x = torch.randn(3, 40, generator=_seeded())
    fmt, tail_fmt = get_format(spec), get_format(spec if ":" not in spec else spec.replace("g32", "g8"))
    if fmt.fixed_layout:  # mxfp4 fixes its block of 32: compare with an explicitly zero-padded tail
        tail = round_trip(torch.nn.functional.pad(x[:, 32:], (0, 24)), fmt)[:, :8]
    else:
        tail = round_trip(x[:, 32:], tail_fmt)
    assert torch.equal(round_trip(x, fmt), torch.cat([round_trip(x[:, :32], fmt), tail], dim=1))


@pytest.mark.parametrize("spec", ["int4:g32", "int8", "fp8_e4m3:tensor", "mxfp4", "nf4"])
def test_round_trip_of_scalars_and_empty_tensors(spec):
    fmt = get_format(spec)
    row = torch.tensor([1.7])
    assert torch.equal(round_trip(torch.tensor(1.7), fmt), round_trip(row, fmt)[0])  # a row of one
    for empty in (torch.zeros(0), torch.zeros(2, 0)):
        assert round_trip(empty, fmt).shape == empty.shape
