"""Each metric on small cases computed by hand."""

import math

import pytest
import torch

from dtypelab import cast_model, compare_models, output_metrics
from dtypelab import compare as compare_module
from dtypelab.compare import (
    ErrorSums,
    cosine_similarity,
    kl_divergence,
    max_abs_diff,
    mean_abs_diff,
    measure,
    relative_error,
    select_output,
    sqnr_db,
    top1_agreement,
)
from dtypelab.errors import InputError

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
    assert bf16.metrics.mean_abs_diff == 0.0009978810558095574
    assert bf16.metrics.max_abs_diff == 0.0016907453536987305
    assert bf16.footprint_bytes == 60 and result.reference_footprint_bytes == 120
    assert bf16.metrics.top1_agreement == 1.0 and bf16.metrics.kl_divergence >= 0
    # fp16 has 3 more mantissa bits than bf16: its error must be smaller on the same input.
    assert result.variants[0].metrics.sqnr_db > bf16.metrics.sqnr_db
    assert "kl_div" in result.to_text()

# ---- ErrorSums / measure: the same metrics in bounded memory ----

def assert_metrics_close(row_metrics, truth):
    # Chunked float64 sums vs compare's whole-tensor metrics (|diff| in float32): equal to float32 rounding.
    for field in ("mean_abs_diff", "max_abs_diff", "relative_error", "sqnr_db", "cosine_similarity"):
        assert getattr(row_metrics, field) == pytest.approx(getattr(truth, field), rel=1e-6, abs=1e-12), field
    assert (row_metrics.nan_count, row_metrics.inf_count) == (truth.nan_count, truth.inf_count)


def test_error_sums_match_whole_tensor_metrics_over_many_chunks(monkeypatch):
    monkeypatch.setattr(compare_module, "_CHUNK_ELEMENTS", 7)  # 60 elements -> 9 chunks
    torch.manual_seed(0)
    ref = torch.randn(3, 4, 5)
    cand = ref.half().float() + 0.01 * torch.randn(3, 4, 5)
    assert_metrics_close(measure(ref, cand), output_metrics(ref, cand))
    logit = measure(ref, cand, logits=True)  # KL and top-1 averaged over position chunks
    truth = output_metrics(ref, cand, logits=True)
    assert logit.kl_divergence == pytest.approx(truth.kl_divergence, rel=1e-9)
    assert logit.top1_agreement == truth.top1_agreement


def test_error_sums_carry_nan_and_inf(monkeypatch):
    monkeypatch.setattr(compare_module, "_CHUNK_ELEMENTS", 2)
    ref = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    cand = torch.tensor([1.0, math.inf, 3.0, math.nan, 5.0])
    sums = ErrorSums()
    sums.add(ref, cand)
    metrics = sums.metrics()
    assert (metrics.nan_count, metrics.inf_count) == (1, 1)
    assert math.isnan(metrics.max_abs_diff) and math.isnan(metrics.sqnr_db)


def test_sqnr_of_an_overflowed_candidate_is_minus_inf():
    assert sqnr_db(REF, torch.tensor([3.0, math.inf])) == -math.inf
    assert math.isnan(sqnr_db(REF, torch.tensor([3.0, math.nan])))
