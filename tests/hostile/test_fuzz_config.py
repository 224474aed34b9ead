"""Fuzzing config.json (issue 18 item 7): a real tiny llama's config with values replaced by generated
JSON of any type, keys dropped, remote code asked for, must pass the guard's validation
(:func:`~dtypelab.checkpoint.guard.check_model_folder`) with sane values or be refused in one line of
ModelSpecError / CheckpointError; and a folder the guard passes then loads, or is refused in one line:
never a traceback from deep inside transformers."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from hostile_helpers import fuzz
from hypothesis import event, given
from hypothesis import strategies as st

from dtypelab.checkpoint import check_model_folder
from dtypelab.checkpoint.guard import (
    MAX_CONFIG_DIMENSION,
    PARAMS_PER_STORED_BYTE,
    PARAMS_SLACK,
    implied_parameters,
    weight_bytes,
)
from dtypelab.errors import DtypelabError
from dtypelab.models import load

SIZE_KEYS = ["hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
             "intermediate_size", "vocab_size", "max_position_embeddings", "head_dim"]
OTHER_KEYS = ["architectures", "torch_dtype", "dtype", "quantization_config", "model_type", "auto_map",
              "tie_word_embeddings", "rms_norm_eps", "rope_theta", "rope_scaling", "hidden_act",
              "attention_bias", "pad_token_id", "initializer_range"]
SCALARS = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8)
JSON = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3)
                    | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=6)
PLAUSIBLE = {
    "size": st.sampled_from([0, 1, 2, 8, 15, 16, 17, 32, 64, -1, 2**31, 10**7, 16.0, "16", True, None]),
    "architectures": st.sampled_from([["LlamaForCausalLM"], ["LlamaModel"], ["pipeline"], ["os.system"],
                                      ["__class__"], [], "LlamaForCausalLM", [1], ["GPT2LMHeadModel"]]),
    "dtype": st.sampled_from(["float32", "bfloat16", "torch.float16", "auto", "float", "int8", "uint1",
                              "Tensor", "__import__", 32]),
    "model_type": st.sampled_from(["llama", "gpt2", "bert", "mistral", "qwen2", "LLAMA", "", "evil", 7]),
}


@st.composite
def configs(draw, base: dict, most_changes: int = 4) -> dict:
    """``base`` with 1 to ``most_changes`` keys replaced by plausible-but-wrong values or by any JSON, or
    dropped."""
    config = dict(base)
    for _ in range(draw(st.integers(1, most_changes))):
        key = draw(st.sampled_from(SIZE_KEYS + OTHER_KEYS))
        if draw(st.integers(0, 5)) == 0:
            config.pop(key, None)
            continue
        kind = ("size" if key in SIZE_KEYS else "dtype" if key in ("torch_dtype", "dtype") else key)
        strategy = PLAUSIBLE.get(kind)
        config[key] = draw(strategy if strategy is not None and draw(st.booleans()) else JSON)
    return config


@pytest.fixture(scope="module")
def base_config(tiny_source) -> dict:
    return json.loads((tiny_source / "config.json").read_text())


def private_folder(tmp_path: Path, tiny_source: Path) -> Path:
    folder = tmp_path / "model"
    if not folder.exists():  # one copy for all examples: each writes only config.json
        shutil.copytree(tiny_source, folder)
    return folder


def checked(folder: Path, config: dict) -> dict | None:
    """check_model_folder on ``config``: the config it passed, or None when refused in one line."""
    (folder / "config.json").write_text(json.dumps(config))
    try:
        return check_model_folder(folder)
    except DtypelabError as exc:
        assert len(str(exc).splitlines()) == 1, str(exc)
        return None


@fuzz(examples=400)
@given(data=st.data())
def test_the_guard_passes_sane_values_or_refuses_in_one_line(tmp_path, tiny_source, base_config, data):
    folder = private_folder(tmp_path, tiny_source)
    passed = checked(folder, data.draw(configs(base_config)))
    event("refused" if passed is None else "passed")
    if passed is None:
        return
    assert "auto_map" not in passed
    for key in SIZE_KEYS:
        value = passed.get(key)
        assert value is None or (type(value) is int and 1 <= value <= MAX_CONFIG_DIMENSION)
    assert implied_parameters(passed) <= PARAMS_PER_STORED_BYTE * weight_bytes(folder) + PARAMS_SLACK


@fuzz(examples=60)
@given(data=st.data())
def test_a_config_the_guard_passes_loads_or_is_refused_in_one_line(tmp_path, tiny_source, base_config, data):
    """Through the whole load (transformers builds the model): fewer examples, each a real load."""
    folder = private_folder(tmp_path, tiny_source)
    config = data.draw(configs(base_config, most_changes=1))  # one change: most reach transformers
    if checked(folder, config) is None:
        event("refused by the guard")
        return
    try:
        load(str(folder))
    except DtypelabError as exc:
        assert len(str(exc).splitlines()) == 1, str(exc)
        event(f"refused while loading: {type(exc).__name__}")
    else:
        event("loaded")
