"""Finding the Linear layers from config.json + safetensors headers, against the meta model it replaces.

Truth: transformers' own model built on the meta device (what ``convert`` used before), and the bytes
``convert`` writes with each way of finding the layers.
"""

from __future__ import annotations

import hashlib

import pytest
import torch

from dtypelab.checkpoint import architecture, convert_checkpoint, open_checkpoint
from dtypelab.checkpoint.architecture import HEADER_RULES, header_linear_layers, meta_linear_layers

transformers = pytest.importorskip("transformers")

SMALL = {"vocab_size": 96, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64}
CONFIGS = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM, SMALL),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM, SMALL),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, SMALL),
    "gpt2": (transformers.GPT2Config, transformers.GPT2LMHeadModel,
             {"vocab_size": 96, "n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 64}),
    "bert": (transformers.BertConfig, transformers.BertModel,
             {"vocab_size": 96, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
              "num_attention_heads": 4, "max_position_embeddings": 64}),
    "bert-mlm": (transformers.BertConfig, transformers.BertForMaskedLM,
                 {"vocab_size": 96, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                  "num_attention_heads": 4, "max_position_embeddings": 64}),
}


@pytest.fixture(scope="module", params=list(CONFIGS))
def folder(request, tmp_path_factory):
    config_cls, model_cls, kwargs = CONFIGS[request.param]
    torch.manual_seed(0)
    model = model_cls(config_cls(**kwargs)).eval()
    path = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(path)
    return path


def test_the_header_rule_finds_what_the_meta_model_finds(folder):
    """The same Linear / Conv1D layers and output head on each architecture of the rule table, the tied
    head included (the checkpoint does not store it, but the output's quantization_config must ignore
    it, or a loader would look for its codes)."""
    source = open_checkpoint(folder)
    config = architecture._config(folder)
    linears, heads, conv1d = header_linear_layers(source, HEADER_RULES[config["model_type"]],
                                                  config["architectures"])
    meta_linears, meta_heads, meta_conv1d = meta_linear_layers(folder)
    assert set(linears) == set(meta_linears) and linears  # a tied head too: the output must ignore it
    assert conv1d == meta_conv1d and heads == meta_heads


def _digests(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_conversion_is_byte_identical_with_and_without_the_meta_model(folder, tmp_path, monkeypatch):
    fast = convert_checkpoint(folder, tmp_path / "fast", "int4:g32")
    monkeypatch.setattr(architecture, "HEADER_RULES", {})  # every architecture through the meta model
    slow = convert_checkpoint(folder, tmp_path / "slow", "int4:g32")
    assert _digests(tmp_path / "fast") == _digests(tmp_path / "slow")
    assert fast.dense_layers.keys() == slow.dense_layers.keys()


def test_the_fast_path_does_not_import_transformers(tmp_path):
    """The point of the rule: a quantized conversion's fixed cost is torch's import, not transformers'."""
    import subprocess
    import sys

    script = ("import sys, torch, transformers\n"
              "from transformers import LlamaConfig, LlamaForCausalLM\n"
              f"m = LlamaForCausalLM(LlamaConfig(**{SMALL!r})); m.save_pretrained({str(tmp_path / 'm')!r})\n")
    subprocess.run([sys.executable, "-c", script], check=True, capture_output=True)
    check = ("import sys\nfrom pathlib import Path\nfrom dtypelab.checkpoint import linear_layers\n"
             f"linear_layers(Path({str(tmp_path / 'm')!r}))\n"
             "print('transformers' in sys.modules)\n")
    done = subprocess.run([sys.executable, "-c", check], check=True, capture_output=True, text=True)
    assert done.stdout.strip() == "False"
