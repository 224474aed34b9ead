"""Hostile model folders (issue 18): a tiny real checkpoint, copied per test so each can damage its own."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_source(tmp_path_factory) -> Path:
    """A 1-layer llama of width 16 saved by save_pretrained (config.json + model.safetensors)."""
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=2, vocab_size=64,
                                      max_position_embeddings=32)
    folder = tmp_path_factory.mktemp("tiny-source")
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    return folder


@pytest.fixture
def tiny_folder(tmp_path, tiny_source) -> Path:
    """A private copy of :func:`tiny_source` to damage."""
    return Path(shutil.copytree(tiny_source, tmp_path / "model"))
