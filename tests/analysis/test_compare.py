"""Each metric on small cases computed by hand."""

import math
import time

import pytest
import torch

from dtypelab import cast_model, compare_models, get_format, output_metrics
from dtypelab.analysis import (
    ErrorSums,
    cosine_similarity,
    kl_divergence,
    max_abs_diff,
    mean_abs_diff,
    measure,
    paired_latency_ms,
    relative_error,
    select_output,
    sqnr_db,
    top1_agreement,
)
from dtypelab.analysis import compare as compare_module
from dtypelab.analysis import metrics as metrics_module
from dtypelab.analysis.timing import is_clearly_slower, ratio_quartiles, take_turns
from dtypelab.errors import InputError
from dtypelab.report import format_cell
from dtypelab.variants import Variant, apply_format

REF = torch.tensor([3.0, 4.0])
CAND = torch.tensor([3.0, 3.0])  # error (0, -1)


def test_abs_diffs_by_hand():
    assert mean_abs_diff(REF, CAND) == 0.5
    assert max_abs_diff(REF, CAND) == 1.0


def test_relative_error_by_hand():
    assert relative_error(REF, CAND) == pytest.approx(1 / 5)  # |(0,-1)| / |(3,4)|


def test_sqnr_by_hand():
    assert sqnr_db(REF, CAND) == pytest.approx(10 * math.log10(25 / 1))
    assert sqnr_db(REF, REF) == math.inf


def test_cosine_by_hand():
    assert cosine_similarity(REF, CAND) == pytest.approx(21 / (5 * math.sqrt(18)))
    assert cosine_similarity(REF, -REF) == pytest.approx(-1.0)


def test_kl_divergence_by_hand():
    ref = torch.tensor([[0.0, 0.0]])  # p = (1/2, 1/2)
    cand = torch.tensor([[math.log(3.0), 0.0]])  # q = (3/4, 1/4)
    expected = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)
    assert kl_divergence(ref, cand) == pytest.approx(expected)
    assert kl_divergence(ref, ref) == 0.0


def test_top1_agreement_by_hand():
    ref = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 1.0], [0.0, 3.0]])
    cand = torch.tensor([[1.0, 0.0], [1.0, 0.0], [2.0, 1.0], [1.0, 0.0]])
    assert top1_agreement(ref, cand) == 0.5


def test_differences_are_taken_in_float32():
    ref = torch.tensor([0.1], dtype=torch.float32)
    cand = ref.to(torch.bfloat16)
    assert mean_abs_diff(ref, cand) == (cand.float() - ref).abs().item()


def test_non_finite_outputs_are_reported_not_averaged_away():
    cand = torch.tensor([3.0, math.inf, math.nan])
    metrics = output_metrics(torch.tensor([3.0, 4.0, 5.0]), cand)
    assert (metrics.nan_count, metrics.inf_count) == (1, 1)
    assert metrics.status == "non-finite output: 1 NaN, 1 inf"
    assert math.isnan(metrics.mean_abs_diff)
    assert "NaN" in output_metrics(torch.ones(3), cand).status


def test_shape_mismatch_is_an_input_error():
    with pytest.raises(InputError, match="output shapes differ"):
        output_metrics(torch.ones(2), torch.ones(3))


def test_select_output_from_mappings():
    out = {"last_hidden_state": torch.ones(1), "pooler_output": torch.zeros(1)}
    assert select_output(out) is out["last_hidden_state"]
    assert select_output(out, "pooler_output") is out["pooler_output"]
    with pytest.raises(InputError, match="choose --output from last_hidden_state, pooler_output"):
        select_output(out, "logits")


def test_compare_models_on_the_seed(dummy, seed_input):
    variants = {"fp16": cast_model(dummy, "fp16"), "bf16": cast_model(dummy, "bf16")}
    result = compare_models(dummy, variants, seed_input, output_kind="logits")
    assert [v.name for v in result.variants] == ["fp16", "bf16"]
    bf16 = result.variants[1]
    # the seed notebook's printed "Mean diff: 0.0009978810558095574 | Max diff: 0.0016907453536987305"
    assert bf16.metrics.mean_abs_diff == 0.0009978810558095574
    assert bf16.metrics.max_abs_diff == 0.0016907453536987305
    assert bf16.stored_bytes == 60 and result.reference_stored_bytes == 120
    assert bf16.metrics.top1_agreement == 1.0 and bf16.metrics.kl_divergence >= 0
    # fp16 has 3 more mantissa bits than bf16: its error must be smaller on the same input.
    assert result.variants[0].metrics.sqnr_db > bf16.metrics.sqnr_db
    assert "kl_divergence" in result.to_text()


# --- Padding, pooled embeddings and the next-token report -----------------------------------------

from torch import nn  # noqa: E402

from dtypelab.analysis import mean_pooled, next_token_metrics, pooled_cosines, valid_positions  # noqa: E402


def test_valid_positions_drops_padding_rows():
    out = torch.arange(12.0).reshape(2, 3, 2)  # (batch, seq, features)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert valid_positions(out, mask).tolist() == [[0.0, 1.0], [2.0, 3.0], [6.0, 7.0]]
    pooled = torch.ones(2, 5)  # (batch, hidden): not per token, kept whole
    assert valid_positions(pooled, mask) is pooled


def test_pooled_cosine_by_hand():
    mask = torch.tensor([[1, 1, 0]])
    ref = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [9.0, 9.0]]])  # mean of real tokens: (0.5, 0.5)
    cand = torch.tensor([[[1.0, 0.0], [1.0, 1.0], [0.0, 0.0]]])  # (1.0, 0.5)
    assert mean_pooled(ref, mask).tolist() == [[0.5, 0.5]]
    expected = (0.5 * 1.0 + 0.5 * 0.5) / (math.sqrt(0.5) * math.sqrt(1.25))
    assert pooled_cosines(ref, cand, mask).item() == pytest.approx(expected, rel=1e-12)


class Encoder(nn.Module):
    """Embeds ids; adds ``noise`` only at padding positions, where no metric may look."""

    def __init__(self, noise: float = 0.0):
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            self.embed = nn.Embedding(10, 4)
        self.noise = noise

    def forward(self, input_ids, attention_mask):
        hidden = self.embed(input_ids)  # (batch, seq, 4)
        return {"last_hidden_state": hidden + self.noise * (1 - attention_mask)[..., None]}


def test_padding_is_masked_out_of_every_metric():
    inputs = {"input_ids": torch.tensor([[1, 2, 3], [4, 5, 0]]),
              "attention_mask": torch.tensor([[1, 1, 1], [1, 1, 0]])}
    result = compare_models(Encoder(), {"noisy-padding": Encoder(noise=5.0)}, inputs, keep_outputs=True)
    metrics = result.variants[0].metrics
    assert metrics.mean_abs_diff == 0 and metrics.max_abs_diff == 0 and metrics.sqnr_db == math.inf
    # identical pooled embeddings: cosine 1 up to float64 rounding of the norms
    assert result.variants[0].embedding_cosine_min == pytest.approx(1.0, abs=1e-12)
    assert (result.positions, result.padding_positions) == (5, 1)
    # the same outputs without the mask differ by 5 at the padded position
    assert output_metrics(result.reference_output, result.variants[0].output).max_abs_diff == 5.0


def _hand_logits():
    ln = math.log
    ref = torch.tensor([[[0.0, ln(2)], [ln(3), 0.0], [7.0, -7.0]]])  # p = (1/3, 2/3), (3/4, 1/4), unused
    cand = torch.tensor([[[ln(3), 0.0], [ln(3), 0.0], [-7.0, 7.0]]])  # p = (3/4, 1/4), (3/4, 1/4), unused
    return ref, cand, torch.tensor([[1, 0, 0]])  # next tokens: 0 after position 0, 0 after position 1


def test_next_token_metrics_by_hand():
    ref, cand, ids = _hand_logits()
    m = next_token_metrics(ref, cand, ids)
    kl0 = (1 / 3) * math.log((1 / 3) / (3 / 4)) + (2 / 3) * math.log((2 / 3) / (1 / 4))  # position 1: 0
    assert m.positions == 2
    assert m.kl_mean == pytest.approx(kl0 / 2) and m.kl_stderr == pytest.approx(kl0 / 2)  # std kl0/√2, /√2
    assert m.kl_median == pytest.approx(kl0 / 2) and m.kl_p99 == pytest.approx(0.99 * kl0)
    assert m.kl_max == pytest.approx(kl0)
    assert m.same_top_p == 0.5 and m.same_top_p_stderr == pytest.approx(0.5)  # top 1 vs 0, then 0 vs 0
    dp0 = 1 / 4 - 2 / 3  # the reference's top token (1) at position 0
    assert m.delta_p_mean == pytest.approx(dp0 / 2)
    assert m.delta_p_rms == pytest.approx(abs(dp0) / math.sqrt(2))
    assert m.ln_ppl_ratio == pytest.approx(math.log(4 / 9) / 2)  # NLL change of token 0 at position 0


def test_ln_ppl_ratio_matches_cross_entropy_perplexities():
    torch.manual_seed(0)
    ref, cand = torch.randn(2, 6, 11), torch.randn(2, 6, 11)
    ids, mask = torch.randint(0, 11, (2, 6)), torch.tensor([[1] * 6, [1] * 4 + [0] * 2])
    labels = ids[:, 1:].masked_fill(~(mask[:, 1:].bool()), -100)  # transformers' ignore_index
    ce = [nn.functional.cross_entropy(x[:, :-1].double().reshape(-1, 11), labels.reshape(-1)).item()
          for x in (ref, cand)]
    m = next_token_metrics(ref, cand, ids, mask)
    assert m.positions == 5 + 3 and m.ln_ppl_ratio == pytest.approx(ce[1] - ce[0], rel=1e-12)
    assert (m.reference_perplexity, m.candidate_perplexity) == pytest.approx([math.exp(c) for c in ce],
                                                                             rel=1e-12)


def test_padding_does_not_change_the_next_token_report():
    ref, cand, ids = _hand_logits()
    garbage = torch.full((1, 2, 2), 50.0)
    padded = [torch.cat([x, g], dim=1) for x, g in [(ref, garbage), (cand, -garbage)]]
    m = next_token_metrics(*padded, torch.tensor([[1, 0, 0, 0, 0]]), torch.tensor([[1, 1, 1, 0, 0]]))
    assert m == next_token_metrics(ref, cand, ids)


def test_identical_logits_give_a_zero_report():
    ref, _, ids = _hand_logits()
    m = next_token_metrics(ref, ref.clone(), ids)
    assert (m.kl_max, m.same_top_p, m.delta_p_rms, m.ln_ppl_ratio) == (0.0, 1.0, 0.0, 0.0)


def test_output_name_that_does_not_exist():
    with pytest.raises(InputError, match="choose --output from logits, hidden"):
        select_output({"logits": torch.zeros(1), "hidden": torch.zeros(1)}, "pooler_output")


# --- Real models ------------------------------------------------------------------------------------

def test_minilm_pooled_embeddings_survive_fp16_and_bf16(minilm, short_texts):
    from dtypelab.models import model_inputs

    inputs = model_inputs(minilm, texts=short_texts)
    variants = {f: cast_model(minilm.model, f) for f in ("fp16", "bf16")}
    result = compare_models(minilm.model, variants, inputs)
    fp16, bf16 = result.variants
    assert result.output_name == "last_hidden_state" and not result.logits
    assert result.padding_positions == int((inputs["attention_mask"] == 0).sum()) > 0
    # Half-precision rounding is relative error ≤ eps/2 per value; through 6 layers the embedding's
    # relative error stays within a few eps, and 1 - cos ≈ rel_err²/2. Allow rel_err ≤ 4·eps.
    for variant, eps in [(fp16, 2**-10), (bf16, 2**-7)]:
        assert 1 - variant.embedding_cosine_min <= (4 * eps) ** 2 / 2
    assert fp16.metrics.sqnr_db > bf16.metrics.sqnr_db  # 3 more mantissa bits: ~18 dB


def test_tiny_llama_report(tiny_llama, short_texts):
    from dtypelab.models import model_inputs

    inputs = model_inputs(tiny_llama, texts=short_texts)
    variants = {f: cast_model(tiny_llama.model, f) for f in ("fp16", "bf16")}
    result = compare_models(tiny_llama.model, variants, inputs)
    fp16, bf16 = (v.next_token for v in result.variants)
    mask = inputs["attention_mask"]
    assert fp16.positions == int((mask[:, 1:] & mask[:, :-1]).sum())
    assert 0 < fp16.kl_mean < bf16.kl_mean and fp16.same_top_p >= bf16.same_top_p
    text = result.to_text()
    assert "Next-token report" in text and "ln_ppl_ratio" in text and "ln(PPL/PPL_ref)" in text
    assert "Next-token report" in result._repr_html_() and "<svg" in result._repr_html_()



def test_a_long_input_is_measured_a_batch_at_a_time_with_the_same_numbers(tiny_llama, short_texts,
                                                                           monkeypatch):
    from dtypelab.models import model_inputs

    inputs = model_inputs(tiny_llama, texts=short_texts)
    variants = {f: cast_model(tiny_llama.model, f) for f in ("fp16", "bf16")}
    whole = compare_models(tiny_llama.model, variants, inputs)
    row_bytes = whole.output_shape[1] * whole.output_shape[2] * 4  # one row's float32 logits
    monkeypatch.setattr(compare_module, "OUTPUT_BATCH_BYTES", 2 * row_bytes)  # two rows per forward
    forwards = []
    handle = variants["bf16"].register_forward_hook(lambda *_: forwards.append(1))
    batched = compare_models(tiny_llama.model, variants, inputs)
    handle.remove()
    rows = inputs["input_ids"].shape[0]
    assert batched.batches == math.ceil(rows / 2) > 1 and len(forwards) == batched.batches
    assert (batched.positions, batched.padding_positions) == (whole.positions, whole.padding_positions)
    assert batched.output_shape == whole.output_shape and f"in {batched.batches} batches" in batched.to_text()
    for one, split in zip(whole.variants, batched.variants, strict=True):
        assert split.output is None  # nothing but the reference's output is held by default
        assert_metrics_close(split.metrics, one.metrics)
        # a forward of 2 rows rounds like one of all rows only up to float32 kernel blocking: 1e-5 relative
        assert split.metrics.kl_divergence == pytest.approx(one.metrics.kl_divergence, rel=1e-5)
        assert split.metrics.top1_agreement == one.metrics.top1_agreement
        for field in ("positions", "kl_mean", "kl_max", "same_top_p", "ln_ppl_ratio"):
            assert getattr(split.next_token, field) == pytest.approx(getattr(one.next_token, field),
                                                                     rel=1e-5), field


def test_keep_outputs_joins_the_batches_back(tiny_llama, short_texts, monkeypatch):
    from dtypelab.models import model_inputs

    inputs = model_inputs(tiny_llama, texts=short_texts)
    monkeypatch.setattr(compare_module, "OUTPUT_BATCH_BYTES", 1)  # one row per forward
    result = compare_models(tiny_llama.model, {"fp32": tiny_llama.model}, inputs, keep_outputs=True)
    assert result.batches == inputs["input_ids"].shape[0]
    assert torch.equal(result.reference_output, result.variants[0].output)
    assert tuple(result.reference_output.shape) == result.output_shape
    assert result.variants[0].metrics.sqnr_db == math.inf


# ---- ErrorSums / measure: the same metrics in bounded memory ----

def assert_metrics_close(row_metrics, truth):
    # Chunked float64 sums vs compare's whole-tensor metrics (|diff| in float32): equal to float32 rounding.
    for field in ("mean_abs_diff", "max_abs_diff", "relative_error", "sqnr_db", "cosine_similarity"):
        assert getattr(row_metrics, field) == pytest.approx(getattr(truth, field), rel=1e-6, abs=1e-12), field
    assert (row_metrics.nan_count, row_metrics.inf_count) == (truth.nan_count, truth.inf_count)


def test_error_sums_match_whole_tensor_metrics_over_many_chunks(monkeypatch):
    monkeypatch.setattr(metrics_module, "_CHUNK_ELEMENTS", 7)  # 60 elements -> 9 chunks
    torch.manual_seed(0)
    ref = torch.randn(3, 4, 5)
    cand = ref.half().float() + 0.01 * torch.randn(3, 4, 5)
    assert_metrics_close(measure(ref, cand), output_metrics(ref, cand))
    logit = measure(ref, cand, logits=True)  # KL and top-1 averaged over position chunks
    truth = output_metrics(ref, cand, logits=True)
    assert logit.kl_divergence == pytest.approx(truth.kl_divergence, rel=1e-9)
    assert logit.top1_agreement == truth.top1_agreement


def test_error_sums_carry_nan_and_inf(monkeypatch):
    monkeypatch.setattr(metrics_module, "_CHUNK_ELEMENTS", 2)
    ref = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    cand = torch.tensor([1.0, math.inf, 3.0, math.nan, 5.0])
    sums = ErrorSums()
    sums.add(ref, cand)
    metrics = sums.metrics()
    assert (metrics.nan_count, metrics.inf_count) == (1, 1)
    assert math.isnan(metrics.max_abs_diff) and math.isnan(metrics.sqnr_db)
    assert sums.reference_absmax == 5.0


def test_error_sums_keep_a_nan_in_the_reference_absmax(monkeypatch):
    """A NaN in the reference (in a chunk before larger values) was dropped by Python's max()."""
    monkeypatch.setattr(metrics_module, "_CHUNK_ELEMENTS", 2)
    ref = torch.tensor([1.0, math.nan, 3.0, 4.0])
    sums = ErrorSums()
    sums.add(ref, ref.clone())
    assert math.isnan(sums.reference_absmax) and math.isnan(ref.abs().max().item())


def test_sqnr_of_an_overflowed_candidate_is_minus_inf():
    assert sqnr_db(REF, torch.tensor([3.0, math.inf])) == -math.inf
    assert math.isnan(sqnr_db(REF, torch.tensor([3.0, math.nan])))


class _Sleepy(torch.nn.Module):
    """Wraps a model and sleeps 50 ms per forward: slower than the reference (~0.05 ms) by construction,
    and still over x1.10 in a round where a busy machine stalls both forwards by tens of milliseconds."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        time.sleep(0.05)
        return self.inner(ids)


def test_timed_compare_warns_when_a_variant_is_slower_than_the_reference(dummy, seed_input):
    result = compare_models(dummy, {"slow": _Sleepy(dummy), "same": dummy}, seed_input, timing=True)
    slow, same = result.variants
    assert slow.latency_ms >= 50.0 and slow.latency_ratio > 1 and slow.slower
    assert result.reference_latency_ms > 0 and same.metrics.sqnr_db == float("inf")
    status = {row[0]: row[-1] for row in result.to_table().rows}
    assert "slower than fp32 here" in status["slow"]
    # the same model at parity: its ratio wanders around 1 by noise, which is not "slower"
    assert not same.slower and status["same"] == "ok"
    assert not slow.emulated and not same.emulated


def test_timed_ratios_are_the_printed_ms_over_the_printed_reference_ms(dummy, seed_input):
    result = compare_models(dummy, {"slow": _Sleepy(dummy), "same": dummy}, seed_input, timing=True)
    table = result.to_table()
    at = {name: table.columns.index(name) for name in ("latency_ms", "reference_latency_ms", "latency_ratio",
                                                        "x per round")}
    for variant, row in zip(result.variants, table.rows, strict=True):
        ms, ref_ms, ratio = (float(format_cell(row[at[c]]))
                             for c in ("latency_ms", "reference_latency_ms", "latency_ratio"))
        assert ratio == pytest.approx(ms / ref_ms, rel=2e-3, abs=1e-3)
        assert variant.latency_ratio == round(variant.latency_ms / variant.reference_latency_ms, 3)
        low, high = (float(x) for x in row[at["x per round"]].split("-"))
        assert 0 < low <= high and variant.latency_rounds >= 7
    # the footer's reference time is the median of every reference run the rows' ratios used
    beside = [v.reference_latency_ms for v in result.variants]
    assert min(beside) <= result.reference_latency_ms <= max(beside)
    assert result.reference_runs == sum(v.latency_rounds for v in result.variants)
    assert f"reference forward: {format_cell(result.reference_latency_ms)} ms" in result.to_text()


def test_an_emulated_format_is_labelled_emulated_never_slower(dummy, seed_input):
    int8 = get_format("int8")
    slow_int8 = Variant("int8", "int8", int8, _Sleepy(apply_format(dummy, int8)))
    result = compare_models(dummy, [slow_int8, Variant.of("bf16", cast_model(dummy, "bf16"))], seed_input,
                            timing=True)
    emulated, bf16 = result.variants
    assert emulated.emulated and emulated.latency_ratio > 1.1 and not emulated.slower
    status = {row[0]: row[-1] for row in result.to_table().rows}
    assert "emulated (dequantize + float matmul)" in status["int8"] and "slower" not in status["int8"]
    assert not bf16.emulated and "emulated" not in status["bf16"]
    assert any(note.startswith("emulated: dtypelab's quantized formats") for note in result.to_table().notes)


def test_compare_times_nothing_unless_asked(dummy, seed_input, monkeypatch):
    def no_timing(*args, **kwargs):
        raise AssertionError("timed without timing=True")

    monkeypatch.setattr(compare_module, "take_turns", no_timing)
    monkeypatch.setattr(compare_module, "forward_latency_ms", no_timing)
    result = compare_models(dummy, {"bf16": cast_model(dummy, "bf16"), "int8": apply_format(dummy, "int8")},
                            seed_input)
    assert not result.timed and all(v.latency_ms is None for v in result.variants)
    assert "latency_ms" not in result.to_table().columns and "emulated" not in result.to_text()


def test_a_timed_compare_without_a_running_variant_still_has_its_footer(dummy, seed_input):
    result = compare_models(dummy, [Variant.failed("broken", "nothing to quantize")], seed_input, timing=True)
    assert result.timed and result.reference_latency_ms > 0 and result.reference_runs == 7


class _Named(torch.nn.Module):
    """Writes its name into a shared log at each forward, to see the order models were run in."""

    def __init__(self, name: str, log: list[str]) -> None:
        super().__init__()
        self.name, self.log = name, log

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        self.log.append(self.name)
        return ids.float()


def test_take_turns_alternates_and_flips_the_order_every_round(seed_input):
    log: list[str] = []
    turns = take_turns(_Named("ref", log), _Named("cand", log), seed_input, warmup=1, rounds=4, min_seconds=0)
    assert log == ["ref", "cand"] + ["ref", "cand", "cand", "ref"] * 2
    assert len(turns.reference_ms) == len(turns.candidate_ms) == len(turns.ratios) == 4


def test_take_turns_runs_more_rounds_for_fast_models_up_to_a_cap(seed_input):
    log: list[str] = []
    turns = take_turns(_Named("ref", log), _Named("cand", log), seed_input, warmup=0, rounds=3,
                       min_seconds=60.0, max_rounds=9)
    assert len(turns.ratios) == 9 and len(log) == 18


@pytest.mark.parametrize("kwargs", [{"rounds": 1}, {"rounds": 5, "max_rounds": 4}, {"warmup": -1},
                                    {"min_seconds": -1.0}])
def test_take_turns_rejects_settings_without_a_spread(dummy, seed_input, kwargs):
    with pytest.raises(InputError):
        take_turns(dummy, dummy, seed_input, **kwargs)


def test_ratio_quartiles_by_hand():
    assert ratio_quartiles([1.0, 2.0, 3.0, 4.0, 5.0]) == (2.0, 4.0)
    with pytest.raises(InputError, match="at least two rounds"):
        ratio_quartiles([1.0])


@pytest.mark.parametrize(("ratio", "low_quartile", "slower"), [
    (300.0, 250.0, True),    # a variant that sleeps beside a 0.1 ms reference
    (1.4, 1.35, True),       # the same, with most reference rounds stalled by a busy machine
    (1.5, 1.12, True),       # over 10 % slower in 3 rounds of 4 and in the median
    (1.05, 1.04, False),     # steady, but within the 10 % margin
    (1.3, 0.95, False),      # the median says slower, a quarter of the rounds or more do not
    (1.02, 1.2, False),      # rounds say slower, the medians do not: not clearly slower
    (1.0, 0.9, False),       # parity
    (0.5, 0.45, False),      # faster
])
def test_slower_only_beyond_the_measured_noise(ratio, low_quartile, slower):
    assert is_clearly_slower(ratio, low_quartile) is slower


def test_failed_variant_is_a_row_with_its_reason(dummy, seed_input):
    result = compare_models(dummy, {"broken": Variant.failed("broken", "nothing to quantize")}, seed_input)
    row = result.variants[0]
    assert row.failure == "nothing to quantize" and row.metrics is None
    assert "failed: nothing to quantize" in result.to_text()


def test_paired_latency_times_every_model(dummy, seed_input):
    assert all(ms > 0 for ms in paired_latency_ms([dummy, dummy], seed_input, warmup=1, runs=3))


def test_kl_ignores_classes_masked_to_minus_inf_in_the_reference():
    """Logits masked to -inf (a padded vocabulary, a banned token) are p = 0: 0·log(0/q) = 0, not NaN."""
    ref = torch.tensor([[0.0, -math.inf, 0.0]])  # p = (1/2, 0, 1/2)
    cand = torch.tensor([[math.log(3.0), -math.inf, 0.0]])  # q = (3/4, 0, 1/4)
    expected = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)
    assert kl_divergence(ref, cand) == pytest.approx(expected)
    ids = torch.tensor([[0, 2]])
    assert next_token_metrics(torch.stack([ref[0], ref[0]])[None], torch.stack([cand[0], cand[0]])[None],
                              ids).kl_mean == pytest.approx(expected)
    # where the reference gives the class mass and the candidate none, KL is infinite
    assert kl_divergence(torch.zeros(1, 2), torch.tensor([[0.0, -math.inf]])) == math.inf


class _FailsInForward(nn.Module):
    def forward(self, ids):
        raise RuntimeError("no kernel for this dtype\nsecond line")


def test_a_variant_whose_forward_fails_is_a_row_with_its_reason(dummy, seed_input):
    result = compare_models(dummy, {"bad": _FailsInForward(), "fp32": cast_model(dummy, "fp32")}, seed_input)
    bad, fine = result.variants
    assert bad.failure == "forward failed: RuntimeError: no kernel for this dtype" and bad.metrics is None
    assert fine.metrics.sqnr_db == math.inf
    assert "failed: forward failed: RuntimeError: no kernel for this dtype" in result.to_text()


class _DoublesItsInput(nn.Module):
    def __init__(self):
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(4)
            self.lin = nn.Linear(4, 3)

    def forward(self, x):
        return self.lin(x.mul_(2))


def test_a_model_writing_into_its_input_changes_neither_the_caller_nor_the_next_model():
    """The reference used to double the caller's tensor, so every variant then ran on 2x the input."""
    model, x = _DoublesItsInput(), torch.arange(8.0).reshape(2, 4)
    before = x.clone()
    result = compare_models(model, {"fp32": cast_model(model, "fp32")}, x)
    assert torch.equal(x, before) and result.variants[0].metrics.sqnr_db == math.inf


@pytest.mark.parametrize(("candidate", "expected"), [([0.0, 0.0], 0.0), ([0.0, 1.0], math.inf),
                                                     ([0.0, math.nan], math.nan)])
def test_relative_error_against_an_all_zero_reference(candidate, expected):
    """No signal: equal is 0, any error is infinitely large, and NaN stays NaN (it read inf)."""
    zeros, cand = torch.zeros(2), torch.tensor(candidate)
    sums = ErrorSums()
    sums.add(zeros, cand)
    for value in (relative_error(zeros, cand), sums.metrics().relative_error):
        assert value == expected or (math.isnan(expected) and math.isnan(value))


def test_floating_inputs_are_given_in_each_variants_dtype():
    # a model fed embeddings (--input-file): its fp16 / bf16 copies get the inputs in their own dtype
    from dtypelab.analysis import compare_models
    from dtypelab.quant import cast_model

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.ReLU(), torch.nn.Linear(4, 3))
    variants = {name: cast_model(model, name) for name in ("fp16", "bf16")}
    result = compare_models(model, variants, torch.randn(5, 8))
    assert [v.failure for v in result.variants] == [None, None]  # before: "forward failed", dtype mismatch
    assert all(v.metrics.sqnr_db > 20 for v in result.variants)  # bf16's 8-bit mantissa: ~40 dB here
