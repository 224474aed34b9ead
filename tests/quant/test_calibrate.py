"""The sequential calibration pipeline on whole models: blocks in order, AWQ's folds, what stays dense.

Truth: the float model's outputs (an int8 AWQ model, whose folds must leave outputs near float), round to
nearest at the same storage (GPTQ's layer outputs on the calibration inputs must not be worse), the
source model's own state dict (never modified), a second run (bit-identical codes).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dtypelab.errors import InputError
from dtypelab.models import model_inputs
from dtypelab.quant import quantize_model
from dtypelab.quant.calibrate import NOT_RUN_REASON, find_blocks


@pytest.fixture(scope="module")
def batches(tiny_llama):
    """Two batches of two 64-token windows of the calibration text."""
    ids = model_inputs(tiny_llama, text_set="calibration", ctx=64, windows=4)
    return [{k: v[i:i + 2] for k, v in ids.items()} for i in (0, 2)]


@pytest.fixture(scope="module")
def held_out(tiny_llama):
    return model_inputs(tiny_llama, text_set="evaluation", ctx=64, windows=2)


@pytest.fixture(scope="module")
def gptq(tiny_llama, batches):
    return quantize_model(tiny_llama.model, "int4:g64:gptq", calibration=batches)


def _kl(reference: nn.Module, candidate: nn.Module, inputs) -> float:
    with torch.no_grad():
        ref, out = reference(**inputs).logits, candidate(**inputs).logits
    return float(torch.nn.functional.kl_div(out.log_softmax(-1), ref.log_softmax(-1), log_target=True,
                                            reduction="sum") / ref[..., 0].numel())


def test_a_calibrated_format_without_inputs_is_refused(tiny_llama):
    with pytest.raises(InputError, match="calibration inputs"):
        quantize_model(tiny_llama.model, "int4:g64:gptq")


def test_gptq_quantizes_every_block_layer_in_order(gptq, tiny_llama):
    names = [layer.name for layer in gptq.quantized]
    assert len(names) == 14 and gptq.calibration.blocks == 2
    assert [layer.name for layer in gptq.calibration.layers] == names
    assert find_blocks(tiny_llama.model, names)[1][0] == "model.layers.1"


def test_gptq_layer_outputs_are_at_least_rtn_on_the_calibration_inputs(gptq):
    for layer in gptq.calibration.layers:
        assert layer.sqnr_db >= layer.rtn_sqnr_db, layer.name


def test_gptq_model_is_closer_than_rtn_on_held_out_text(gptq, tiny_llama, held_out):
    rtn = quantize_model(tiny_llama.model, "int4:g64")
    assert _kl(tiny_llama.model, gptq.model, held_out) < _kl(tiny_llama.model, rtn.model, held_out)


def test_same_inputs_give_bit_identical_codes(gptq, tiny_llama, batches):
    again = quantize_model(tiny_llama.model, "int4:g64:gptq", calibration=batches)
    for name, buffer in gptq.model.state_dict().items():
        assert torch.equal(buffer, again.model.state_dict()[name]), name


def test_awq_folds_into_norms_and_keeps_outputs(tiny_llama, batches):
    """A fold divides the norm's weight g by s and multiplies the layer's inputs columns by s: their product
    must stay W diag(g) up to int8 rounding; the source model is never touched."""
    before = {k: v.clone() for k, v in tiny_llama.model.state_dict().items()}
    result = quantize_model(tiny_llama.model, "int8:channel:awq", calibration=batches)
    folded = {layer.name: layer.folded_into for layer in result.calibration.layers}
    assert folded["model.layers.0.self_attn.q_proj"] == "model.layers.0.input_layernorm"
    assert folded["model.layers.1.mlp.up_proj"] in ("", "model.layers.1.post_attention_layernorm")
    assert folded["model.layers.0.self_attn.o_proj"] == ""  # its input is attention's, no norm's
    norm = "model.layers.0.input_layernorm"
    old = tiny_llama.model.get_submodule(norm).weight * tiny_llama.model.get_submodule(
        "model.layers.0.self_attn.q_proj").weight  # W diag(g): what the block computes from the normed x
    new = result.model.get_submodule(norm).weight * result.model.get_submodule(
        "model.layers.0.self_attn.q_proj").qtensor.dequantize()  # Q(W s) diag(g / s)
    assert 10 * torch.log10(old.pow(2).sum() / (new - old).pow(2).sum()) > 35  # int8 RTN: ~43 dB
    for name, tensor in tiny_llama.model.state_dict().items():
        assert torch.equal(tensor, before[name]), f"source modified: {name}"
    assert set(result.calibration.folded) <= {f"{n}.weight" for n in folded.values() if n}


def test_awq_is_at_least_rtn_per_layer(tiny_llama, batches):
    result = quantize_model(tiny_llama.model, "int4:g64:awq", calibration=batches)
    for layer in result.calibration.layers:
        assert layer.sqnr_db >= layer.rtn_sqnr_db - 1e-6, layer.name


class _TwoLayers(nn.Module):
    def __init__(self):
        super().__init__()
        self.first, self.second, self.unused = nn.Linear(64, 64), nn.Linear(64, 32), nn.Linear(64, 64)

    def forward(self, x):
        return self.second(torch.relu(self.first(x)))


def test_a_model_without_blocks_calibrates_on_one_pass():
    """A plain stack of Linears (no ModuleList) is calibrated layer by layer on one hooked forward; a
    layer the forward never reaches stays dense, saying why."""
    torch.manual_seed(0)
    model = _TwoLayers()
    inputs = [torch.randn(16, 64) @ torch.randn(64, 64) for _ in range(2)]
    result = quantize_model(model, "int4:g32:gptq", calibration=inputs)
    assert [layer.name for layer in result.quantized] == ["first", "second"]
    assert {layer.name: layer.reason for layer in result.skipped} == {"unused": NOT_RUN_REASON}


@pytest.mark.slow  # ~10 s: GPT-2's Conv1D layers, two quantizations and a model load
def test_conv1d_layers_calibrate_as_their_transpose():
    pytest.importorskip("transformers")
    from dtypelab.models import load

    gpt2 = load("tiny-gpt2", "fp32")
    ids = model_inputs(gpt2, text_set="calibration", ctx=64, windows=2)
    result = quantize_model(gpt2.model, "int4:g64:gptq", calibration=[ids])
    assert {layer.kind for layer in result.quantized} == {"Conv1D"}
    assert all(layer.sqnr_db >= layer.rtn_sqnr_db for layer in result.calibration.layers)
    held = model_inputs(gpt2, text_set="evaluation", ctx=64, windows=2)
    assert _kl(gpt2.model, result.model, held) < _kl(gpt2.model, quantize_model(gpt2.model, "int4:g64").model,
                                                      held)


# ---- calibrated formats in a mixed-precision plan ------------------------------------------------------

def _planned(model: nn.Module, calibrated: str, other: str, pick) -> dict[str, str]:
    """Every decoder Linear in ``calibrated`` where ``pick(name)``, else in ``other``."""
    return {name: calibrated if pick(name) else other for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and name.startswith("model.layers.")}


def test_a_plan_mixing_gptq_and_int8_calibrates_only_its_gptq_layers(tiny_llama, batches, gptq):
    """The plan's int8 layers are rounded to nearest (equal to plain int8's codes); its GPTQ layers are
    calibrated with the int8 layers already in place, so each still beats round to nearest on its own
    calibration inputs, and the source model is untouched."""
    mapping = _planned(tiny_llama.model, "int4:g64:gptq", "int8", lambda n: ".mlp." in n)
    result = quantize_model(tiny_llama.model, mapping, calibration=batches)
    plain = quantize_model(tiny_llama.model, "int8")
    calibrated = {layer.name for layer in result.calibration.layers}
    assert calibrated == {n for n, f in mapping.items() if f.endswith("gptq")} and len(calibrated) == 6
    for name, fmt in mapping.items():
        module = result.model.get_submodule(name)
        assert module.fmt.name == fmt, name
        if fmt == "int8":
            rounded = plain.model.get_submodule(name).qtensor.dequantize()
            assert torch.equal(module.qtensor.dequantize(), rounded), name
    for layer in result.calibration.layers:
        assert layer.sqnr_db >= layer.rtn_sqnr_db, layer.name
    assert result.calibration.method == "gptq"


def test_a_plan_without_calibration_inputs_is_refused(tiny_llama):
    mapping = _planned(tiny_llama.model, "int4:g64:awq", "int8", lambda n: "layers.0." in n)
    with pytest.raises(InputError, match="int4:g64:awq choose codes from calibration inputs"):
        quantize_model(tiny_llama.model, mapping)


def test_awq_folds_only_where_every_reader_of_the_norm_shares_its_format(tiny_llama, batches):
    """q/k/v read one norm's output: with all three in int4:g64:awq the scale is folded into the norm;
    with k and v in int8 (rounded before calibration, reading the same norm) a fold would change their
    inputs, so q is clipped only, and says so; the model's output stays that of its layers."""
    whole = quantize_model(tiny_llama.model, _planned(tiny_llama.model, "int4:g64:awq", "int8",
                                                      lambda n: "self_attn" in n), calibration=batches)
    split = quantize_model(tiny_llama.model, _planned(tiny_llama.model, "int4:g64:awq", "int8",
                                                      lambda n: "q_proj" in n), calibration=batches)
    whole_q = {c.name: c for c in whole.calibration.layers}["model.layers.0.self_attn.q_proj"]
    split_q = {c.name: c for c in split.calibration.layers}["model.layers.0.self_attn.q_proj"]
    assert whole_q.folded_into == "model.layers.0.input_layernorm" and whole_q.alpha > 0
    assert split_q.folded_into == "" and split_q.alpha == 0 and "another format" in split_q.note
    norm = "model.layers.0.input_layernorm.weight"
    assert torch.equal(split.model.state_dict()[norm], tiny_llama.model.state_dict()[norm])
