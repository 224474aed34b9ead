"""Overflow headroom against torch's own casts, the keep list repairing a model that overflows fp16,
weight statistics by hand, and the noise floor / verdict."""

import math

import pytest
import torch

from dtypelab import KeepPolicy, cast_model
from dtypelab.analysis import (
    OutputMetrics,
    RangeCounts,
    keep_list,
    noise_floor_db,
    predict_headroom,
    rounding_floor_db,
    run_model,
    sqnr_db,
    variant_verdict,
    weight_stats,
)
from dtypelab.errors import InputError
from dtypelab.formats import all_formats, get_format
from dtypelab.quant import round_trip
from layer_models import OverflowModel, minilm, minilm_input, overflow_input

# Plain casts only: scaled formats (fp8_e4m3 with its per-channel scale, MX) are not a torch cast.
TORCH_FLOATS = [f for f in all_formats() if f.is_floating_point and not f.is_quantized]


def test_fp16_counts_by_hand():
    # 70000 and 65520 (the tie above 65504 rounds to even = 2^16) overflow; 65519 rounds down to 65504.
    # 1e-8 is below half the smallest subnormal (2^-24 / 2) and flushes; 3e-8 and 1e-5 land subnormal.
    values = torch.tensor([70000.0, 65520.0, 65519.0, -1e-8, 3e-8, 1e-5, 1.0, 0.0])
    counts = RangeCounts()
    counts.add_values(values, get_format("fp16"))
    assert (counts.overflowed, counts.flushed_to_zero, counts.subnormal) == (2, 1, 2)
    assert counts.absmax == 70000.0 and counts.nonzero == 7
    assert counts.headroom_bits(get_format("fp16")) == pytest.approx(math.log2(65504 / 70000))
    assert counts.verdict() == "overflow"


def test_saturation_counts_as_overflow_but_rounding_down_to_max_does_not():
    # e4m3fn saturates at 448; round to nearest puts everything up to 448 + 16 (half the top step) on 448
    # anyway, so only 1000 and 470 are clipped. The same threshold as convert's cast report and the
    # quantizer's clip count (dtypelab.quant.damage), so headroom and convert agree on every value.
    fmt = get_format("fp8_e4m3:cast")
    counts = RangeCounts()
    counts.add_values(torch.tensor([1000.0, 470.0, 460.0, 1.0]), fmt)
    assert counts.overflowed == 2 and counts.verdict() == "overflow"
    half = RangeCounts()  # fp16: 65519 rounds down onto 65504 (not lost), the tie 65520 rounds up to inf
    half.add_values(torch.tensor([65519.0, 65520.0]), get_format("fp16"))
    assert half.overflowed == 1



@pytest.mark.parametrize("fmt", TORCH_FLOATS, ids=lambda f: f.name)
def test_counts_equal_torch_cast(fmt):
    torch.manual_seed(0)
    exponents = torch.empty(4000).uniform_(-148, 127.9)  # 2^-148 .. 2^127.9: every regime, all finite in fp32
    values = torch.sign(torch.randn(4000)) * torch.exp2(exponents)
    cast = values.to(fmt.torch_dtype).float()
    counts = RangeCounts()
    counts.add_values(values, fmt)
    finfo = torch.finfo(fmt.torch_dtype)
    assert counts.overflowed == int(cast.isinf().sum())
    assert counts.flushed_to_zero == int((cast == 0).sum())
    assert counts.subnormal == int(((cast.abs() > 0) & (cast.abs() < finfo.smallest_normal)).sum())
    assert counts.absmax == values.abs().max().item()


def test_fp16_breaks_the_overflow_model_and_the_generated_keep_list_repairs_it():
    model, ids = OverflowModel(), overflow_input()
    reference = run_model(model, ids)
    broken = run_model(cast_model(model, "fp16"), ids)
    assert not broken.isfinite().all()  # fp16 alone: inf/NaN at the output
    report = predict_headroom(model, ids, ["fp16", "bf16"])
    # wo overflows fp16; kept, it hands its float32 output to the norm after it, which must be kept too
    # (cast to fp16 on its way in, that output would be inf): "a big Linear and its norm in float32"
    assert report.keep["fp16"] == ["blocks.1.norm_out", "blocks.1.wo"] and report.keep["bf16"] == []
    assert report.keep_status == {"fp16": "verified", "bf16": "verified"}
    overflowing = {r.name for r in report.rows if r.format == "fp16" and r.overflows}
    assert overflowing == {"blocks.1.wo"}
    repaired = run_model(cast_model(model, "fp16", report.keep_policy("fp16")), ids)
    assert repaired.isfinite().all()
    # The rest runs in fp16, so the repaired output carries fp16 rounding noise; 20 dB (error one tenth of
    # the signal) is far below fp16's floor (~60 dB here) and far above a broken output (-inf / NaN).
    assert sqnr_db(reference, repaired) > 20


def test_keep_list_starts_where_the_overflow_starts():
    from dtypelab.analysis import LayerHeadroom

    def row(name, overflow):
        return LayerHeadroom(name, "M", "fp16", RangeCounts(numel=1, overflowed=overflow), None)

    rows = [row("a.b.c", 1), row("a.b", 1), row("a", 0), row("x.y", 1), row("x", 0), row("x.z", 1),
            row("", 0)]
    assert keep_list(rows) == ["a.b.c", "x.y", "x.z"]  # the deepest overflowing modules
    assert keep_list([row("a.b", 1), row("a", 1), row("", 1)]) == ["a.b"]
    assert keep_list([row("a", 0)]) == []


def test_headroom_rows_selected_by_depth_but_keep_list_uses_all():
    model, ids = OverflowModel(), overflow_input()
    report = predict_headroom(model, ids, ["fp16"], depth=1)
    assert {r.name for r in report.rows} == {"", "embed", "head"}
    assert report.keep["fp16"] == ["blocks.1.norm_out", "blocks.1.wo"]
    assert "keep in float32 for fp16: 'blocks.1.norm_out', 'blocks.1.wo' (verified" in report.to_text()


@pytest.mark.slow
def test_minilm_fits_fp16_and_bf16():
    report = predict_headroom(minilm(), minilm_input(), ["fp16", "bf16"])
    assert report.keep == {"fp16": [], "bf16": []}
    assert all(r.activations.overflowed == 0 for r in report.rows)


def test_weight_stats_by_hand():
    linear = torch.nn.Linear(4, 1, bias=False)
    with torch.no_grad():
        linear.weight.copy_(torch.tensor([[1.0, -1.0, 3.0, -3.0]]))  # mean 0, variance 5, E[x^4] = 41
    report = weight_stats(linear, ["fp32", "bf16"])
    stats = report.rows[0]
    assert stats.absmax == 3.0 and stats.std == pytest.approx(math.sqrt(5))
    assert stats.kurtosis == pytest.approx(41 / 25 - 3) and stats.outlier_share == 0.0
    assert stats.sqnr_db == {"fp32": math.inf, "bf16": math.inf}  # +-1, +-3 are exact in bf16


def test_weight_outliers():
    with torch.no_grad():
        model = torch.nn.Linear(1000, 1, bias=False)
        model.weight.zero_()
        model.weight[0, 0] = 100.0  # one spike, 31.6 std from the mean
    stats = weight_stats(model, ["fp16"]).rows[0]
    assert stats.outlier_share == pytest.approx(1 / 1000)
    n = 1000  # one spike among n values: m4 / m2^2 = (n^2 - 3n + 3) / (n - 1), worked out by hand
    assert stats.kurtosis == pytest.approx((n * n - 3 * n + 3) / (n - 1) - 3, rel=1e-9)


@pytest.mark.parametrize("fmt", TORCH_FLOATS, ids=lambda f: f.name)
def test_weight_only_error_equals_torch_cast(fmt):
    torch.manual_seed(0)
    model = torch.nn.Linear(64, 32)
    report = weight_stats(model, [fmt])
    for stats, (name, param) in zip(report.rows, model.named_parameters(), strict=True):
        assert stats.name == name
        assert stats.sqnr_db[fmt.name] == sqnr_db(param.detach(), param.detach().to(fmt.torch_dtype))


def test_noise_floor_by_hand():
    # 1 + 2^-12 is a quarter of fp16's ulp above 1 and rounds to 1: noise 2^-24, signal 1 + (1 + 2^-12)^2.
    values = torch.tensor([1.0, 1.0 + 2**-12])
    expected = 10 * math.log10((1 + (1 + 2**-12) ** 2) / 2**-24)
    assert noise_floor_db(values, "fp16") == pytest.approx(expected)
    assert noise_floor_db(values, "fp32") == math.inf


def metrics(sqnr, nan=0, inf=0, top1=None):
    return OutputMetrics(0.0, 0.0, 0.0, sqnr, 1.0, None, top1, nan, inf)


def test_variant_verdict_rules():
    # NOISE_MARGIN_DB = 3: a variant may sit 3 dB below the rounding floor (twice its noise power).
    assert variant_verdict(metrics(57.0), 60.0) == "within format noise"
    assert variant_verdict(metrics(56.9), 60.0) == "degraded"
    assert variant_verdict(metrics(70.0, inf=1), 60.0) == "broken"
    assert variant_verdict(metrics(70.0, nan=3), 60.0) == "broken"
    assert variant_verdict(metrics(70.0, top1=0.8), 60.0) == "broken"
    assert variant_verdict(metrics(70.0, top1=0.95), 60.0) == "within format noise"
    assert variant_verdict(metrics(30.0), None) == "unknown"
    assert variant_verdict(metrics(math.inf), math.inf) == "within format noise"


def test_rounding_floor_of_one_linear_by_hand():
    torch.manual_seed(0)
    layer = torch.nn.Linear(16, 8)
    x = torch.randn(4, 16)
    fmt = get_format("bf16")
    def rt(tensor):
        return round_trip(tensor, fmt)

    # Weights and bias rounded, the product in float32, the (leaf) output rounded once more.
    expected_out = rt(torch.nn.functional.linear(x, rt(layer.weight), rt(layer.bias)))
    expected = sqnr_db(layer(x), expected_out)
    assert rounding_floor_db(layer, fmt, x) == pytest.approx(expected, rel=1e-9)
    assert rounding_floor_db(layer, "fp32", x) == math.inf
    assert all(p.dtype == torch.float32 and p.requires_grad for p in layer.parameters())  # untouched


@pytest.mark.parametrize("fmt", ["fp16", "bf16"])
def test_casts_of_a_healthy_model_are_within_format_noise(fmt):
    from dtypelab.analysis import compare_layers
    from layer_models import llama_input, tiny_llama

    model = tiny_llama()
    result = compare_layers(model, {fmt: cast_model(model, fmt)}, llama_input(2, 16), patterns=["lm_head"])
    variant = result.variants[0]
    assert variant.verdict == "within format noise", (variant.final.sqnr_db, variant.noise_floor_db)
    assert math.isfinite(variant.noise_floor_db)


def test_scaled_formats_are_not_predicted_but_said_so():
    """int8's max_finite (127) and smallest normal are in units of a per-row scale: a fixed-range count
    against them flagged every layer of a healthy model "subnormal" before."""
    model, ids = OverflowModel(), overflow_input()
    report = predict_headroom(model, ids, ["int8", "fp16", "int4"])
    assert {r.format for r in report.rows} == {"fp16"} and list(report.keep) == ["fp16"]
    assert set(report.not_predicted) == {"int8", "int4"}
    assert "not predicted for int8: a scaled format has no fixed range" in report.to_text()
    with pytest.raises(InputError, match="no keep list for int8"):
        report.keep_policy("int8")
    with pytest.raises(InputError, match="no keep list for bf16"):
        report.keep_policy("bf16")


def test_headroom_depth_zero_is_refused_not_ignored():
    with pytest.raises(InputError, match="--depth 0"):
        predict_headroom(OverflowModel(), overflow_input(), ["fp16"], depth=0)


@pytest.mark.parametrize("spec", ["int8", "int4:g32", "int8:a8"])
def test_rounding_floor_of_a_scaled_format_is_its_quantized_model_in_float32(spec):
    """Scaled formats store weights only (activations stay float, or are fake-quantized per ``:a8``), so
    their floor is the quantized model itself; before, every leaf output was rounded per row to int8 /
    int4 too, giving a floor below the variant's own SQNR (35.6 dB against 40.3 dB for int8 here)."""
    from dtypelab.quant import quantize_model
    from layer_models import llama_input, tiny_llama

    model, ids = tiny_llama(), llama_input()
    expected = sqnr_db(run_model(model, ids).logits, run_model(quantize_model(model, spec).model, ids).logits)
    # float64 sums over the same values, only summed in another order (chunks vs whole tensor)
    assert rounding_floor_db(model, spec, ids) == pytest.approx(expected, rel=1e-9)
    assert noise_floor_db(torch.randn(4, 64), spec) is None  # activations are never stored in the format


def test_values_already_non_finite_in_float32_are_reported_apart():
    """inf / NaN in the float32 run is no format's doing: counted on their own, never as overflow."""
    counts = RangeCounts()
    counts.add_values(torch.tensor([math.inf, -math.inf, math.nan, 1.0, 0.0]), get_format("fp16"))
    assert (counts.non_finite, counts.overflowed, counts.nonzero, counts.absmax) == (3, 0, 1, 1.0)
    assert counts.verdict() == "non-finite in float32"


def test_an_overflowing_model_output_is_said_to_need_a_wider_format():
    """When the model's own output exceeds fp16, no keep list inside the model changes that: the note
    says so (instead of listing '', which --keep refuses)."""

    class Loud(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = torch.nn.Parameter(torch.tensor(1e3))  # the model computes in its dtype

        def forward(self, x):
            return x * self.scale * 1e3  # (batch, n): above fp16's 65504 in the model's own forward

    report = predict_headroom(Loud(), torch.ones(1, 3), ["fp16"])
    assert report.keep["fp16"] == [] and report.keep_status["fp16"] == "output overflows"
    note = "the model's own output overflows fp16, which no keep list inside the model changes"
    assert note in report.to_text()


class ScoresOverflow(torch.nn.Module):
    """Self-attention whose q·k scores exceed fp16 inside its forward while every module output fits:
    q and k reach ~300, their dot product over 16 dims ~1e6 (softmax of inf is NaN)."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v = (torch.nn.Linear(16, 16, bias=False) for _ in range(3))
        with torch.no_grad():
            for layer in (self.q, self.k):
                layer.weight.fill_(20.0)

    def forward(self, x):  # (batch, seq, 16)
        scores = self.q(x) @ self.k(x).transpose(-1, -2)  # (batch, seq, seq)
        return torch.softmax(scores, dim=-1) @ self.v(x)


class AttentionModel(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = ScoresOverflow()
        self.head = torch.nn.Linear(16, 4)

    def forward(self, x):
        return self.head(x + self.attn(x))


class Residual(torch.nn.Module):
    """A block adding 3.4e4 to the residual stream: after two the stream exceeds fp16's 65504. (Inputs
    ~N(0, 1000): fp16's step at 3.4e4 is 32, a few percent of them, so the rest of the fp16 model still
    carries the signal.)"""

    def __init__(self) -> None:
        super().__init__()
        self.mlp = torch.nn.Linear(16, 16)
        with torch.no_grad():
            self.mlp.weight.fill_(0.0)
            self.mlp.bias.fill_(3.4e4)

    def forward(self, h):
        return h + self.mlp(h)


class ResidualModel(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = torch.nn.ModuleList([Residual(), Residual()])
        self.norm = torch.nn.LayerNorm(16)
        self.head = torch.nn.Linear(16, 4)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


def test_a_kept_head_whose_float32_logits_fit_is_verified_not_called_hopeless():
    class LoudHead(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.body = torch.nn.Linear(4, 4)
            self.head = torch.nn.Linear(4, 2)
            with torch.no_grad():
                self.head.weight.fill_(1e5)  # logits ~1e5: beyond fp16, fine in float32

        def forward(self, x):
            return self.head(self.body(x))

    torch.manual_seed(0)
    report = predict_headroom(LoudHead(), torch.randn(2, 4), ["fp16"])
    assert report.keep["fp16"] == ["head"] and report.keep_status["fp16"] == "verified"


@pytest.mark.parametrize("build, expected", [
    (OverflowModel, ["blocks.1.norm_out", "blocks.1.wo"]),  # a Linear's output
    (AttentionModel, ["attn"]),  # attention scores inside a module whose output fits
    (ResidualModel, ["blocks.1", "norm"]),  # the residual stream, and the norm that reads it
], ids=["linear", "attention-scores", "residual-stream"])
def test_the_predicted_keep_list_repairs_each_kind_of_overflow(build, expected):
    torch.manual_seed(0)
    model = build().eval()
    inputs = overflow_input() if build is OverflowModel else torch.randn(2, 5, 16) * (
        1000 if build is ResidualModel else 1)
    assert not run_model(cast_model(model, "fp16"), inputs).isfinite().all()  # broken without a keep list
    report = predict_headroom(model, inputs, ["fp16"])
    assert report.keep["fp16"] == expected and report.keep_status["fp16"] == "verified"
    policy = KeepPolicy.from_strings(report.keep["fp16"])  # what --keep NAME --keep NAME builds
    repaired = run_model(cast_model(model, "fp16", policy), inputs)
    assert repaired.isfinite().all()
    # fp16 rounding everywhere else: 20 dB is far below fp16's floor and far above a broken output
    assert sqnr_db(run_model(model, inputs), repaired) > 20


def test_a_peer_asked_for_is_named_with_its_reason_like_a_scaled_format(dummy, seed_input):
    report = predict_headroom(dummy, seed_input, ["fp16", "int8", "quanto:qint8"])
    assert set(report.not_predicted) == {"int8", "quanto:qint8"}
    assert "peer library" in report.not_predicted["quanto:qint8"]
    assert {r.format for r in report.rows} == {"fp16"}


def _metrics(sqnr, top1=None, kl=None, nan=0):
    return OutputMetrics(0.0, 0.0, 0.0, sqnr, 1.0, kl, top1, nan_count=nan)


def test_weight_only_scaled_formats_are_judged_by_quality_bands_not_a_floor():
    from dtypelab.analysis.verdict import QUALITY_BANDS, quality_band

    assert [b.name for b in QUALITY_BANDS] == ["near-lossless", "close", "degraded"]
    # MiniLM's measured int8 (30.5 dB) and int4:g128 (10.0 dB) rows, and a 3.8 dB layer
    assert variant_verdict(_metrics(30.5), None, fmt="int8") == "near-lossless"
    assert variant_verdict(_metrics(24.9), 99.0, fmt="fp8_e4m3") == "close"  # a floor is ignored for them
    assert variant_verdict(_metrics(10.0), None, fmt="int4:g128") == "degraded"
    assert variant_verdict(_metrics(3.8), None, fmt="int4:g128") == "broken"
    assert quality_band(_metrics(35.0), embedding_cosine_min=0.95) == "degraded"  # every criterion counts
    assert quality_band(_metrics(35.0, top1=0.99, kl=0.2)) == "degraded"
    # plain casts and activation-rounding formats keep the floor
    assert variant_verdict(_metrics(40.0), 42.0, fmt="fp16") == "within format noise"
    assert variant_verdict(_metrics(20.0), 42.0, fmt="int8:a8") == "degraded"
    assert variant_verdict(_metrics(20.0), None, fmt="int8:a8") == "unknown"


def test_layer_rows_and_the_variant_verdict_use_one_rule():
    from dtypelab.analysis import compare_layers
    from dtypelab.analysis.verdict import QUALITY_BANDS
    from dtypelab.variants import build_variants

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 64)).eval()
    x = torch.randn(4, 64)
    result = compare_layers(model, build_variants(model, "int4:g32,fp16"), x)
    int4, fp16 = result.variants
    assert int4.verdict in {"close", "degraded"} and fp16.verdict == "within format noise"
    for row in int4.rows:  # judged by the bands on their own SQNR, never a bare "ok"
        expected = next((b.name for b in QUALITY_BANDS if row.metrics.sqnr_db >= b.min_sqnr_db), "broken")
        assert row.verdict == expected
    assert all(r.verdict == "within format noise" for r in fp16.rows)
    assert int4.rows[-1].verdict == int4.verdict and fp16.rows[-1].verdict == fp16.verdict  # = the output
