"""Calibrated convert: :gptq / :awq folders loaded back by dtypelab and by transformers + compressed-tensors.

Truth: the calibrated model in memory (``quantize_model`` on the same calibration batches: codes are
bit-identical for the same inputs and threads), transformers' own loading of the compressed-tensors
folder, the source folder's files (never modified).
"""

from __future__ import annotations

import contextlib
import io
import json

import pytest
import torch

from dtypelab.cli import main
from dtypelab.errors import InputError
from dtypelab.models import load, model_inputs
from dtypelab.quant import quantize_model
from dtypelab.variants import calibration_data, convert_calibrated
from helpers import run_cli

TOKENS = 256
SPECS = ["int4:g64:gptq", pytest.param("int4:g64:awq", marks=pytest.mark.slow)]  # awq: ~20 s more


def _logits(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


@pytest.fixture(scope="module")
def source(sharded_llama_folder):
    return load(str(sharded_llama_folder), "fp32")


@pytest.fixture(scope="module", params=SPECS)
def converted(request, sharded_llama_folder, tmp_path_factory):
    """(spec, output folder, what the run printed): gptq through the CLI, awq through the library."""
    spec, out = request.param, tmp_path_factory.mktemp("calibrated") / "out"
    before = {p.name: p.read_bytes() for p in sharded_llama_folder.iterdir()}
    if spec.endswith("gptq"):
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed), contextlib.suppress(SystemExit):  # main exits 0 or returns
            main(["convert", str(sharded_llama_folder), "-o", str(out), "--to", spec, "--calib-tokens",
                  str(TOKENS), "--json"])
        result = json.loads(printed.getvalue())
    else:
        written = convert_calibrated(sharded_llama_folder, out, spec, calib_tokens=TOKENS)
        result = json.loads(written.to_json())
    assert {p.name: p.read_bytes() for p in sharded_llama_folder.iterdir()} == before  # source untouched
    return spec, out, result


def test_convert_loads_back_equal_to_the_model_in_memory(converted, source):
    pytest.importorskip("compressed_tensors")
    from transformers import AutoModelForCausalLM

    spec, out, _ = converted
    data = calibration_data(source, calib_tokens=TOKENS)
    expected_model = quantize_model(source.model, spec, calibration=data.batches).model
    held = model_inputs(source, text_set="evaluation", ctx=64, windows=2)
    expected = _logits(expected_model, held)
    assert torch.equal(_logits(load(str(out)).model, held), expected)
    hf = AutoModelForCausalLM.from_pretrained(out)
    assert torch.equal(_logits(hf, held), expected)  # the package decompresses to the same float32 weights


def test_config_records_scheme_and_calibration(converted):
    spec, out, result = converted
    config = json.loads((out / "config.json").read_text())
    calibration = config["dtypelab_calibration"]
    assert calibration["format"] == spec and calibration["tokens"] == TOKENS
    assert config["quantization_config"]["config_groups"]["group_0"]["weights"]["group_size"] == 64
    assert config["quantization_config"]["ignore"] == ["lm_head"]
    assert result["format"] == spec


def test_awq_writes_the_norms_it_folded(converted, source):
    from safetensors import safe_open

    spec, out, _ = converted
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        norm = f.get_tensor("model.layers.0.input_layernorm.weight")
    folded = spec.endswith("awq")
    assert torch.equal(norm, source.model.model.layers[0].input_layernorm.weight) != folded


def test_bad_requests_are_one_line(sharded_llama_folder, tmp_path, capsys):
    with pytest.raises(InputError, match="data-free"):
        convert_calibrated(sharded_llama_folder, tmp_path / "o", "int4:g64")
    code, _, err = run_cli(capsys, "convert", sharded_llama_folder, "-o", tmp_path / "o2", "--to",
                           "int4:g64:gptq", "--max-shard-size", "1MB")
    assert code == 2 and "--max-shard-size: not with a calibrated" in err
    code, _, err = run_cli(capsys, "convert", sharded_llama_folder, "-o", tmp_path / "o3", "--to", "int4:g64",
                           "--calib-tokens", "512")
    assert code == 2 and "calibrate :gptq / :awq formats" in err
    assert not (tmp_path / "o2").exists() and not (tmp_path / "o3").exists()


# ---- a mixed-precision plan naming calibrated formats ---------------------------------------------------

@pytest.fixture(scope="module")
def gptq_plan(source, tmp_path_factory):
    """The MLPs in int4:g64:gptq, attention in int8 (rounded to nearest), the rest dense; as a file."""
    from dtypelab.quant import LayerChoice, MixedPlan, layer_weights, model_fingerprint

    names = [n for n, m in source.model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    layers = {n: LayerChoice("int4:g64:gptq" if ".mlp." in n else "int8", 0) for n in names}
    plan = MixedPlan(layers, "tiny-llama", model_fingerprint(layer_weights(source.model, names)), "test")
    path = tmp_path_factory.mktemp("plan") / "plan.json"
    plan.save(path)
    return plan, path


def test_a_calibrated_plan_converts_to_the_model_in_memory(gptq_plan, source, sharded_llama_folder, tmp_path,
                                                           capsys):
    """`convert --plan` with a :gptq layer: the folder holds one config group per scheme, loads back in
    dtypelab and in transformers to the logits of quantize_model(plan) on the same calibration batches."""
    pytest.importorskip("compressed_tensors")
    from transformers import AutoModelForCausalLM

    plan, path = gptq_plan
    out = tmp_path / "planned"
    code, printed, err = run_cli(capsys, "convert", sharded_llama_folder, "-o", out, "--plan", path,
                                 "--calib-tokens", TOKENS, "--json")
    assert code == 0, err
    data = calibration_data(source, calib_tokens=TOKENS)
    expected_model = quantize_model(source.model, plan, calibration=data.batches).model
    held = model_inputs(source, text_set="evaluation", ctx=64, windows=2)
    expected = _logits(expected_model, held)
    assert torch.equal(_logits(load(str(out)).model, held), expected)
    assert torch.equal(_logits(AutoModelForCausalLM.from_pretrained(out), held), expected)
    config = json.loads((out / "config.json").read_text())
    groups = config["quantization_config"]["config_groups"].values()
    targets = {g["weights"]["num_bits"]: set(g["targets"]) for g in groups}
    assert targets == {4: {n for n, f in plan.formats.items() if f.endswith("gptq")},
                       8: {n for n, f in plan.formats.items() if f == "int8"}}
    calibration = config["dtypelab_calibration"]
    assert calibration["plan"] == "test" and calibration["method"] == "gptq"
    assert json.loads(printed)["format"] == "plan: int4:g64:gptq+int8"


def test_a_calibrated_plan_refuses_what_it_decides_itself(gptq_plan, sharded_llama_folder, tmp_path):
    plan, _ = gptq_plan
    with pytest.raises(InputError, match="the plan already says"):
        convert_calibrated(sharded_llama_folder, tmp_path / "o", plan=plan, keep=["lm_head"])
    with pytest.raises(InputError, match="one of them"):
        convert_calibrated(sharded_llama_folder, tmp_path / "o", "int4:g64:gptq", plan=plan)
    assert not (tmp_path / "o").exists()
