"""compare's --compute: a deployment's compute (bf16, W8A8 on torch._int_mm), said in the row."""

from __future__ import annotations

import copy

import pytest
import torch

from dtypelab.analysis import COMPUTES, compare_models
from dtypelab.analysis.compare import COMPUTE_MODES
from dtypelab.errors import InputError
from dtypelab.models import load, model_inputs
from dtypelab.quant import computing_in, int8_matmul, quantize_model
from dtypelab.variants import build_variants
from helpers import run_cli


def test_every_compute_choice_has_a_mode():
    assert set(COMPUTES) == set(COMPUTE_MODES) and COMPUTES[0] == "reference"


def test_float32_weights_computed_in_bf16_measure_as_torchs_bf16_copy(tiny_llama, short_texts):
    """Independent truth: the float32 model run in bf16 (every floating tensor, and activations) is what
    torch's own ``.to(torch.bfloat16)`` copy computes from the same token ids: the same outputs."""
    inputs = model_inputs(tiny_llama, texts=short_texts)
    reference = tiny_llama.model
    as_deployed = compare_models(reference, {"fp32": copy.deepcopy(reference)}, inputs, compute="bf16")
    torch_copy = compare_models(reference, {"bf16": copy.deepcopy(reference).to(torch.bfloat16)}, inputs)
    deployed, stored = as_deployed.variants[0], torch_copy.variants[0]
    assert deployed.metrics.sqnr_db == stored.metrics.sqnr_db
    assert deployed.metrics.kl_divergence == stored.metrics.kl_divergence
    assert deployed.dtype == "float32" and "bfloat16" in deployed.compute  # stored as is, run in bf16
    assert stored.compute is None and "computed in bfloat16" in as_deployed.to_text()


def test_a_quantized_variant_in_bf16_dequantizes_into_bf16(tiny_llama, short_texts):
    inputs = model_inputs(tiny_llama, texts=short_texts)
    reference = tiny_llama.model
    candidates = build_variants(reference, "int8")
    in_bf16 = compare_models(reference, candidates, inputs, compute="bf16").variants[0]
    in_fp32 = compare_models(reference, build_variants(reference, "int8"), inputs).variants[0]
    assert in_bf16.stored_bytes == in_fp32.stored_bytes and in_bf16.dtype == in_fp32.dtype
    assert in_bf16.metrics.sqnr_db < in_fp32.metrics.sqnr_db  # bf16's own rounding on top of int8's


def test_computing_in_restores_every_tensor_and_keeps_ties():
    model = load("tiny-gpt2", "fp32").model
    quantize_model(model, "int4:g64")  # quantized layers keep their codes; the rest is re-typed
    originals = dict(model.state_dict(keep_vars=True))
    with computing_in(model, torch.bfloat16) as retyped:
        assert retyped > 0
        wte, head = model.transformer.wte.weight, model.lm_head
        assert wte.dtype == torch.bfloat16
        assert getattr(head, "weight", wte) is wte  # tied: one copy for both
    after = model.state_dict(keep_vars=True)
    assert originals and all(after[name] is tensor for name, tensor in originals.items())


def test_int8_compute_uses_the_integer_kernel_for_w8a8_rows_only(tiny_llama, short_texts):
    inputs = model_inputs(tiny_llama, texts=short_texts)
    reference = tiny_llama.model
    candidates = build_variants(reference, "int8:a8,int4:g64")
    result = compare_models(reference, candidates, inputs, compute="int8")
    w8a8, int4 = result.variants
    assert "torch._int_mm" in w8a8.compute and "W8A8" in w8a8.compute and not w8a8.emulated
    assert "no W8A8" in int4.compute and int4.emulated
    with int8_matmul(candidates["int8:channel:a8"].model):  # the same forwards, run by hand
        by_hand = compare_models(reference, {"w8a8": candidates["int8:channel:a8"].model}, inputs)
    assert by_hand.variants[0].metrics.sqnr_db == w8a8.metrics.sqnr_db


def test_an_unknown_compute_is_refused():
    with pytest.raises(InputError, match="unknown compute 'fp4'.*reference, bf16, int8"):
        compare_models(torch.nn.Linear(2, 2), {}, torch.zeros(1, 2), compute="fp4")


def test_the_cli_refuses_compute_with_layers(capsys):
    code, out, err = run_cli(capsys, "compare", "dummy", "--to", "bf16", "--layers", "--compute", "bf16")
    assert code == 2 and out == "" and "--compute bf16" in err and len(err.strip().splitlines()) == 1
