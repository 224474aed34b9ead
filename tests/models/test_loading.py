"""dtypelab.load: built-ins, Hugging Face folders (single file and sharded), pickles on request, and
every bad model path refused with a one-line error."""

import json

import pytest
import torch

from dtypelab.errors import CheckpointError, InputError, ModelSpecError, NotRunnableError
from dtypelab.formats import all_formats
from dtypelab.models import BUILTIN_MODELS, load, tiny_gpt2, tiny_llama

pytest.importorskip("transformers")

FLOAT_FORMATS = [f.name for f in all_formats() if f.is_floating_point and f.torch_dtype.itemsize >= 2]


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
def test_tiny_lms_are_deterministic_and_leave_global_rng_alone(name):
    factory = BUILTIN_MODELS[name].factory
    torch.manual_seed(7)
    expected_next = torch.rand(1)
    torch.manual_seed(7)
    a, b = factory(), factory()
    assert torch.rand(1) == expected_next
    for (ka, ta), (kb, tb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert ka == kb and torch.equal(ta, tb)


def test_tiny_gpt2_ties_its_head_and_tiny_llama_does_not():
    gpt2, llama = tiny_gpt2(), tiny_llama()
    assert gpt2.lm_head.weight is gpt2.transformer.wte.weight
    assert llama.lm_head.weight is not llama.model.embed_tokens.weight


@pytest.mark.parametrize("fmt", FLOAT_FORMATS)
def test_builtin_lm_in_dtype_equals_torch_cast_of_float32(fmt, tiny_llama):
    loaded = load("tiny-llama", fmt)
    dtype = next(f.torch_dtype for f in all_formats() if f.name == fmt)
    assert loaded.kind == "causal-lm" and loaded.tokenizer is not None
    ref = tiny_llama.model.state_dict()
    for name, ours in loaded.model.state_dict().items():
        assert torch.equal(ours, ref[name].to(dtype)), name


def test_minilm_loads_offline_as_an_encoder(minilm):
    assert minilm.kind == "transformers"
    assert minilm.output_kind == BUILTIN_MODELS["minilm"].output_kind == "hidden"  # the registry applies
    assert type(minilm.model).__name__ == "BertModel" and minilm.tokenizer.vocab_size == 30522
    assert minilm.max_length == 512


@pytest.mark.parametrize("fmt", ["fp16", "bf16"])
def test_folder_loaded_in_dtype_equals_torch_cast(fmt, sharded_llama_folder, tiny_llama):
    """Loading straight into fp16/bf16 gives exactly torch's cast of the float32 checkpoint."""
    loaded = load(str(sharded_llama_folder), fmt)
    dtype = loaded.model.dtype
    assert dtype == {"fp16": torch.float16, "bf16": torch.bfloat16}[fmt]
    ref = tiny_llama.model.state_dict()
    for name, tensor in loaded.model.state_dict().items():
        assert torch.equal(tensor, ref[name].to(dtype)), name


def test_sharded_folder_round_trips_the_model(sharded_llama_folder, tiny_llama):
    index = json.loads((sharded_llama_folder / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1  # really sharded
    loaded = load(str(sharded_llama_folder))
    assert loaded.kind == "causal-lm" and loaded.model.dtype == torch.float32  # auto: as stored
    ids = torch.tensor([[1, 40, 41, 42]])
    with torch.no_grad():
        assert torch.equal(loaded.model(ids).logits, tiny_llama.model(ids).logits)


def test_auto_keeps_the_checkpoint_dtype(tmp_path, tiny_llama):
    load("tiny-llama", "bf16").model.save_pretrained(tmp_path)
    assert load(str(tmp_path)).model.dtype == torch.bfloat16
    assert load(str(tmp_path), "fp32").model.dtype == torch.float32


def test_factory_spec_still_works():
    loaded = load("dtypelab.models:DummyModel", "fp16")
    assert loaded.kind == "module" and loaded.model.head.weight.dtype == torch.float16


def _write_config_only(folder, tiny_llama):
    tiny_llama.model.config.save_pretrained(folder)


def test_missing_path(tmp_path):
    with pytest.raises(ModelSpecError, match="no such file or folder"):
        load(str(tmp_path / "nope"))
    with pytest.raises(ModelSpecError, match="no such file or folder"):
        load("missing.safetensors")


def test_folder_without_config_or_weights(tmp_path):
    with pytest.raises(ModelSpecError, match="no config.json and no weights"):
        load(str(tmp_path))


def test_folder_with_config_but_no_weights(tmp_path, tiny_llama):
    _write_config_only(tmp_path, tiny_llama)
    with pytest.raises(ModelSpecError, match="config.json but no weights"):
        load(str(tmp_path))


@pytest.mark.parametrize(("damage", "match"), [
    (lambda data: data[:-100], "corrupt or truncated .* incomplete metadata"),
    (lambda data: b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all", "invalid JSON"),
    (lambda data: data[:4], "header too small"),
])
def test_corrupt_or_truncated_safetensors_in_a_folder(tmp_path, tiny_llama, damage, match):
    tiny_llama.model.save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(damage(weights.read_bytes()))
    with pytest.raises(CheckpointError, match=match):
        load(str(tmp_path))


def test_missing_shard(tmp_path, tiny_llama):
    tiny_llama.model.save_pretrained(tmp_path, max_shard_size="100KB")
    next(tmp_path.glob("model-0000*.safetensors")).unlink()
    with pytest.raises(CheckpointError, match="is missing"):
        load(str(tmp_path))


def test_bare_safetensors_is_not_runnable(tmp_path, tiny_llama):
    tiny_llama.model.save_pretrained(tmp_path)
    with pytest.raises(NotRunnableError, match="can be inspected"):
        load(str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").unlink()
    with pytest.raises(NotRunnableError, match="no config.json"):
        load(str(tmp_path))


def _pickle_folder(folder, tiny_llama):
    _write_config_only(folder, tiny_llama)
    torch.save(tiny_llama.model.state_dict(), folder / "pytorch_model.bin")


def test_pickle_weights_need_the_explicit_flag(tmp_path, tiny_llama):
    _pickle_folder(tmp_path, tiny_llama)
    with pytest.raises(ModelSpecError, match="--allow-pickle"):
        load(str(tmp_path))
    loaded = load(str(tmp_path), allow_pickle=True)
    for name, tensor in loaded.model.state_dict().items():
        assert torch.equal(tensor, tiny_llama.model.state_dict()[name]), name


def test_bare_safetensors_inspection_goes_to_the_header_reader(tmp_path, tiny_llama):
    from dtypelab.models import inspect

    tiny_llama.model.save_pretrained(tmp_path)
    result = inspect(str(tmp_path / "model.safetensors"))
    assert "model.layers.0.self_attn.q_proj.weight" in result.to_text()
    assert result.stored_bytes == sum(t.numel() * 4 for t in tiny_llama.model.state_dict().values())


def _resave_with(folder, change):
    """Rewrite ``model.safetensors`` in ``folder`` after ``change(state_dict)``."""
    from safetensors.torch import load_file, save_file

    state = load_file(folder / "model.safetensors")
    change(state)
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})


@pytest.mark.parametrize(("change", "match"), [
    (lambda state: state.pop("model.layers.0.mlp.up_proj.weight"), "lacks model.layers.0.mlp.up_proj.weight"),
    (lambda state: state.update({"model.norm.weight": torch.ones(3)}), "wrong shape for model.norm.weight"),
])
def test_weights_transformers_would_fill_at_random_are_refused(tmp_path, tiny_llama, change, match):
    """transformers initialises a missing or mis-shaped weight at random and only logs it."""
    tiny_llama.model.save_pretrained(tmp_path)
    _resave_with(tmp_path, change)
    with pytest.raises(CheckpointError, match=match):
        load(str(tmp_path))


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
def test_builtin_descriptions_name_the_true_layer_count(name):
    model = BUILTIN_MODELS[name].factory()
    assert f"{model.config.num_hidden_layers}-layer" in BUILTIN_MODELS[name].description


def test_tiny_llama_has_the_weights_its_docstring_counts():
    vocab, hidden, kv, mlp = 259, 256, 2 * 64, 512  # 2 key/value heads of 256 / 4 = 64 dims
    layer = hidden * hidden * 2 + hidden * kv * 2 + 3 * hidden * mlp + 2 * hidden  # q o, k v, mlp, norms
    expected = 2 * vocab * hidden + 2 * layer + hidden  # untied embedding and head, final norm
    assert sum(p.numel() for p in tiny_llama().parameters()) == expected == 1_313_536
    assert all(width % 128 == 0 for width in (hidden, kv, mlp))  # every default group size divides


def test_loaded_model_reports_its_device(tiny_llama):
    assert tiny_llama.device == next(tiny_llama.model.parameters()).device == torch.device("cpu")


def test_the_dtype_is_handed_to_from_pretrained(monkeypatch, sharded_llama_folder):
    """No float32 model first: transformers gets the target dtype and converts while reading
    (bench_load measures the effect)."""
    import transformers

    calls = []
    original = transformers.LlamaForCausalLM.from_pretrained.__func__

    def spy(cls, path, *args, **kwargs):
        calls.append(kwargs.get("dtype"))
        return original(cls, path, *args, **kwargs)

    monkeypatch.setattr(transformers.LlamaForCausalLM, "from_pretrained", classmethod(spy))
    load(str(sharded_llama_folder), "bf16")
    load(str(sharded_llama_folder))
    assert calls == [torch.bfloat16, "auto"]


def test_a_broken_tokenizer_file_is_a_one_line_error(tmp_path, tiny_llama):
    tiny_llama.model.save_pretrained(tmp_path)
    tiny_llama.tokenizer.save_pretrained(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ModelSpecError, match="cannot read the tokenizer in .* fix or remove"):
        load(str(tmp_path))


@pytest.mark.parametrize("device", ["no-such-device", "cuda:99"])
def test_a_device_torch_cannot_use_is_a_one_line_error(device):
    with pytest.raises(InputError, match=f"cannot put the model on device '{device}'"):
        load("dummy", device=device)
