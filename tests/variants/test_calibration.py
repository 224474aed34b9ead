"""Calibration inputs: the bundled calibration text (never the evaluation text), --calib-file, the bound.

Truth: the text sets of dtypelab.models.texts and the tokenizer's own ids.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from dtypelab.errors import InputError
from dtypelab.models import load, token_windows
from dtypelab.models.texts import calibration_text, evaluation_text
from dtypelab.variants import build_variant, calibration_data, parse_variant_specs


def test_bundled_text_windows_are_calibration_text_bounded_by_tokens(tiny_llama):
    data = calibration_data(tiny_llama, calib_tokens=1000, ctx=128)
    ids = torch.cat([b["input_ids"] for b in data.batches])
    assert data.tokens == 896 and ids.shape == (7, 128) and data.ctx == 128  # 1000 // 128 whole windows
    expected = token_windows(tiny_llama.tokenizer, calibration_text(), 128)["input_ids"][:7]
    assert torch.equal(ids, expected)
    held_out = token_windows(tiny_llama.tokenizer, evaluation_text(), 128)["input_ids"]
    assert not any(torch.equal(row, other) for row in ids for other in held_out)
    assert data.settings()["source"] == "calibration text"


def test_calib_file_text_and_tensors(tiny_llama, tmp_path):
    text = tmp_path / "calib.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 40, encoding="utf-8")
    data = calibration_data(tiny_llama, text, calib_tokens=256, ctx=64)
    assert data.tokens == 256 and data.source == str(text)
    tensors = tmp_path / "calib.safetensors"
    save_file({"input_ids": torch.randint(0, 200, (6, 32))}, str(tensors))
    data = calibration_data(tiny_llama, tensors, calib_tokens=100)
    assert data.tokens == 96 and len(data.batches) == 1  # 100 // 32 = 3 rows


@pytest.mark.parametrize(("kwargs", "words"), [
    ({"calib_tokens": 10 ** 9}, "fewer than --calib-tokens"),
    ({"calib_tokens": 1}, "too few"),
])
def test_bad_requests_are_one_line(tiny_llama, kwargs, words):
    with pytest.raises(InputError, match=words):
        calibration_data(tiny_llama, **kwargs)


def test_a_model_without_tokenizer_needs_tensor_inputs():
    dummy = load("dummy")
    with pytest.raises(InputError, match="no tokenizer"):
        calibration_data(dummy)


def test_a_calibrated_variant_without_data_is_a_row_with_its_reason(tiny_llama):
    spec = parse_variant_specs("int4:g64:gptq")[0]
    variant = build_variant(tiny_llama.model, spec)
    assert not variant.ok and "calibration inputs" in variant.failure


def test_a_calibrated_variant_records_its_settings(tiny_llama):
    spec = parse_variant_specs("int4:g64:gptq")[0]
    data = calibration_data(tiny_llama, calib_tokens=256, ctx=64)
    variant = build_variant(tiny_llama.model, spec, calibration=data)
    assert variant.ok and variant.calibration.summary()["tokens"] == 256
    assert variant.calibration.source == "calibration text" and variant.calibration.ctx == 64


def test_a_calibrated_build_reports_each_block(tiny_llama):
    """Calibration is the part of a build that takes minutes: its progress reaches the caller per block
    (tiny-llama's decoder layers, then the layers outside every block), in order, ending at the total."""
    spec = parse_variant_specs("int4:g64:gptq")[0]
    data = calibration_data(tiny_llama, calib_tokens=128, ctx=64)
    events = []
    build_variant(tiny_llama.model, spec, calibration=data, progress=events.append)
    blocks = [e for e in events if e.stage == "calibration"]
    layers = len(tiny_llama.model.model.layers)
    assert [e.done for e in blocks] == list(range(layers + 2)) and blocks[-1].total == layers + 1
    assert [e.detail for e in blocks[1:-1]] == [f"model.layers.{i}" for i in range(layers)]


def test_encoder_windows_carry_the_special_tokens_its_inputs_do(minilm):
    """An encoder's inputs are tokenised [CLS] text [SEP]; calibrating without them would leave those
    positions' activations (outliers in BERT) out of every Hessian. Causal LMs' windows carry none."""
    data = calibration_data(minilm, calib_tokens=1024)
    ids = data.batches[0]["input_ids"]
    wrapped = minilm.tokenizer("a")["input_ids"]
    assert ids.shape == (2, 512) and (ids[:, 0] == wrapped[0]).all() and (ids[:, -1] == wrapped[-1]).all()
