"""checkpoint/guard.py's pieces: JSON depth, the parameter estimate, regular files only."""

from __future__ import annotations

import json
import os
import types

import pytest

from dtypelab.checkpoint import guard, staging
from dtypelab.errors import CheckpointError, ModelSpecError


def test_json_depth_counts_nesting_without_recursion():
    assert guard.json_depth(3) == 0
    assert guard.json_depth({"a": [1, {"b": []}]}) == 4
    deep: list = []
    for _ in range(5000):  # deeper than json.loads could even parse
        deep = [deep]
    assert guard.json_depth(deep) == guard.MAX_JSON_DEPTH + 1  # stops at the first level past the limit


def test_parse_json_refuses_depth_past_the_limit_and_accepts_it_at_the_limit(tmp_path):
    at_limit = "[" * guard.MAX_JSON_DEPTH + "]" * guard.MAX_JSON_DEPTH
    assert guard.parse_json(tmp_path / "x.json", at_limit.encode()) == json.loads(at_limit)
    with pytest.raises(CheckpointError, match="64-level limit"):
        guard.parse_json(tmp_path / "x.json", ("[" + at_limit + "]").encode())


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_implied_parameters_is_close_to_the_real_count(name):
    transformers = pytest.importorskip("transformers")
    if name == "llama":
        config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                          num_attention_heads=4, vocab_size=100)
        model = transformers.LlamaForCausalLM(config)
    else:
        config = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=100, n_positions=32)
        model = transformers.GPT2LMHeadModel(config)
    real = sum(p.numel() for p in model.parameters())  # tied gpt2 head counted once
    implied = guard.implied_parameters(config.to_dict())
    assert 0.8 * real <= implied <= 1.6 * real


def test_a_fifo_is_refused_without_blocking(tmp_path):
    os.mkfifo(tmp_path / "f.json")
    with pytest.raises(CheckpointError, match="not a regular file"):
        guard.read_json_file(tmp_path / "f.json")


def test_a_config_within_the_size_bound_passes(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(bytes(1000))
    guard.check_implied_size(tmp_path / "config.json", {"hidden_size": 1024, "num_hidden_layers": 1,
                                                        "vocab_size": 1000}, guard.weight_bytes(tmp_path))
    with pytest.raises(ModelSpecError, match="parameters"):
        guard.check_implied_size(tmp_path / "config.json", {"hidden_size": 1024, "num_hidden_layers": 8,
                                                            "vocab_size": 1000}, guard.weight_bytes(tmp_path))


def test_rename_no_replace_without_renameat2_checks_just_before(tmp_path, monkeypatch):
    monkeypatch.setattr(staging.ctypes, "CDLL", lambda *a, **k: types.SimpleNamespace())
    source, target = tmp_path / "a", tmp_path / "b"
    source.write_text("a")
    target.mkdir()
    with pytest.raises(FileExistsError):
        staging._rename_no_replace(source, target)
    target.rmdir()
    staging._rename_no_replace(source, target)
    assert target.read_text() == "a"
