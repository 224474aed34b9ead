"""GPT-2's Conv1D layers are quantized like the Linear layers they are, in memory and on disk."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import dtypelab
from dtypelab.checkpoint import convert_checkpoint, read_header


@pytest.fixture(scope="module")
def gpt2_folder(tmp_path_factory):
    loaded = dtypelab.load("tiny-gpt2")
    folder = tmp_path_factory.mktemp("gpt2")
    loaded.model.save_pretrained(folder)
    return loaded.model, folder


@pytest.mark.parametrize("spec", ["int8", "int4:g32", "int4:g32:asym", "fp8_e4m3"])
def test_conv1d_weights_are_stored_as_their_transpose_and_load_back(gpt2_folder, spec, tmp_path):
    model, folder = gpt2_folder
    result = convert_checkpoint(folder, tmp_path / "out", spec, verify=True)
    assert sum(t.action == "quantized" for t in result.tensors) == 8  # c_attn, c_proj, c_fc, c_proj x 2
    assert result.cautions and "transformers + compressed-tensors 0.20 cannot load them" in result.cautions[0]
    assert "caution: 8 Conv1D layer(s)" in result.to_text()
    header = {e.name: e for e in read_header(tmp_path / "out" / "model.safetensors").tensors}
    c_fc = model.transformer.h[0].mlp.c_fc  # Conv1D weight (in 256, out 1024)
    assert tuple(c_fc.weight.shape) == (256, 1024)
    if "weight_shape" in {n.rsplit(".", 1)[1] for n in header}:  # pack-quantized: the (out, in) it holds
        shape = load_file(tmp_path / "out" / "model.safetensors")["transformer.h.0.mlp.c_fc.weight_shape"]
        assert shape.tolist() == [1024, 256]
    else:
        assert tuple(header["transformer.h.0.mlp.c_fc.weight"].shape) == (1024, 256)
    ids = torch.randint(0, 259, (2, 11))
    ours = dtypelab.quantize_model(model, spec).model
    loaded = dtypelab.load(str(tmp_path / "out")).model
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, ours(ids).logits)


def test_compare_quantizes_gpt2s_conv1d_and_says_what_stays_dense(gpt2_folder):
    model, _ = gpt2_folder
    result = dtypelab.quantize_model(model, "int8")
    kinds = {(o.kind, o.quantized) for o in result.layers}
    assert ("Conv1D", True) in kinds and len(result.quantized) == 8
    assert {o.name for o in result.skipped} == {"transformer.wte", "transformer.wpe", "lm_head"}


@pytest.mark.xfail(strict=True, reason="compressed-tensors 0.20 applies quantization to nn.Linear and "
                   "nn.Embedding modules only (quantization/lifecycle/initialize.py); transformers' GPT-2 "
                   "keeps Conv1D, so its quantized parts are left unloaded and the weights random")
def test_transformers_with_compressed_tensors_loads_quantized_conv1d(gpt2_folder, tmp_path):
    pytest.importorskip("compressed_tensors")
    from transformers import AutoModelForCausalLM

    model, folder = gpt2_folder
    convert_checkpoint(folder, tmp_path / "out", "int8")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    ids = torch.randint(0, 259, (2, 11))
    with torch.no_grad():
        assert torch.equal(theirs(ids).logits, dtypelab.quantize_model(model, "int8").model(ids).logits)


def test_head_and_embeddings_are_the_same_explicit_options_as_in_compare(tmp_path):
    from dtypelab.errors import InputError

    loaded = dtypelab.load("tiny-llama")
    folder = tmp_path / "llama"
    loaded.model.save_pretrained(folder)
    default = convert_checkpoint(folder, tmp_path / "dense-head", "int8")
    assert "lm_head" in default.dense_layers and "--head" in default.dense_layers["lm_head"]
    with_head = convert_checkpoint(folder, tmp_path / "with-head", "int8", head=True)
    assert "lm_head" not in with_head.dense_layers
    ours = dtypelab.quantize_model(loaded.model, "int8", head=True).model
    ids = torch.randint(0, 259, (1, 7))
    with torch.no_grad():
        assert torch.equal(dtypelab.load(str(tmp_path / "with-head")).model(ids).logits, ours(ids).logits)
    with pytest.raises(InputError, match="embeddings stay dense"):
        convert_checkpoint(folder, tmp_path / "emb", "int8", embeddings=True)
    assert not (tmp_path / "emb").exists()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("architecture", ["gpt2", "llama"])
def test_counting_on_the_second_thread_reports_the_damage_counted_inline(gpt2_folder, architecture, dtype,
                                                                       tmp_path, monkeypatch):
    """Whole conversions with the smallest chunks (32 rows), GPT-2's Conv1D weights (read whole,
    transposed) and Llama's Linear ones (each chunk read ahead on the second thread), float32 and bf16
    sources: every tensor's damage, counted on the second thread while the next chunk is read and
    quantized, and every byte written equal those of the conversion counting in line."""
    import threading
    import time

    from test_layouts import narrow_llama

    from dtypelab.checkpoint import ChunkQuantizer, streaming
    from dtypelab.checkpoint import convert as convert_module

    model = gpt2_folder[0] if architecture == "gpt2" else narrow_llama()
    source = tmp_path / "source"
    model.to(dtype).save_pretrained(source)
    model.float()
    monkeypatch.setattr(convert_module, "ChunkQuantizer", lambda fmt: ChunkQuantizer(fmt, chunk_elements=1))
    from dtypelab.checkpoint import writer

    threads, readers, real, read = set(), set(), streaming.read_back_damage, writer.read_exact
    def slow_count(*args):  # held back, so a read ahead that overwrote a set still counted would show
        threads.add(threading.current_thread().name)
        time.sleep(0.002)
        return real(*args)

    monkeypatch.setattr(streaming, "read_back_damage", slow_count)
    monkeypatch.setattr(writer, "read_exact",
                        lambda *args: readers.add(threading.current_thread().name) or read(*args))
    threaded = convert_checkpoint(source, tmp_path / "threaded", "int4:g32", verify=True)
    assert any(name.startswith("dtypelab-count") for name in threads)
    if architecture == "llama":  # Linear weights in several chunks: the later ones read ahead
        assert any(name.startswith("dtypelab-count") for name in readers)
    counting = ChunkQuantizer.counting
    monkeypatch.setattr(ChunkQuantizer, "counting", lambda self, chunks: counting(self, 1))  # inline
    inline = convert_checkpoint(source, tmp_path / "inline", "int4:g32")
    assert [t for t in threaded.tensors if t.action == "quantized"]
    assert threaded.tensors == inline.tensors
    for name in ("model.safetensors",):
        assert (tmp_path / "threaded" / name).read_bytes() == (tmp_path / "inline" / name).read_bytes()


def test_a_read_ahead_that_fails_is_one_clear_error_with_nothing_left(tmp_path, monkeypatch):
    """A chunk read ahead on the second thread that hits the end of a file (the shard changed under the
    conversion): the error reaches the caller with its message, no output is left, no thread runs on."""
    import threading

    from test_layouts import narrow_llama

    from dtypelab.checkpoint import ChunkQuantizer, writer
    from dtypelab.checkpoint import convert as convert_module
    from dtypelab.errors import CheckpointError

    source = tmp_path / "source"
    narrow_llama().save_pretrained(source)
    monkeypatch.setattr(convert_module, "ChunkQuantizer", lambda fmt: ChunkQuantizer(fmt, chunk_elements=1))
    read = writer.read_exact

    def truncated_ahead(fd, view, offset, path, name):
        if threading.current_thread().name.startswith("dtypelab-count"):
            raise CheckpointError(f"{path}: tensor {name!r}: file ended at byte {offset}, before the data "
                                  "its header promised: truncated or changed while reading")
        return read(fd, view, offset, path, name)

    monkeypatch.setattr(writer, "read_exact", truncated_ahead)
    with pytest.raises(CheckpointError, match="file ended at byte"):
        convert_checkpoint(source, tmp_path / "out", "int4:g32")
    assert [p.name for p in tmp_path.iterdir()] == ["source"]  # no output, no staging folder
    assert not [t for t in threading.enumerate() if t.name.startswith("dtypelab-count")]
