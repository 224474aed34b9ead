import pytest
import torch
from torch import nn

from dtypelab import KeepPolicy, cast_model, inspect_model, param_dtype_lines, print_param_dtype
from dtypelab.errors import CheckpointError, ModelSpecError
from dtypelab.models import inspect, load


def test_every_parameter_with_dtype_shape_and_bytes(dummy):
    info = inspect_model(dummy)
    assert [t.name for t in info.tensors] == [n for n, _ in dummy.named_parameters()]
    row = info.tensors[0]
    assert (row.name, row.kind, row.dtype, row.shape, row.numel, row.nbytes) == (
        "token_embedding.weight", "parameter", "float32", (2, 2), 4, 16)
    assert info.footprint_bytes == 30 * 4  # 30 float32 weights
    assert [(s.dtype, s.tensors, s.numel) for s in info.by_dtype] == [("float32", 11, 30)]


def test_print_param_dtype_prints_the_notebook_lines(dummy, capsys):
    print_param_dtype(cast_model(dummy, "bf16"))
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "token_embedding.weight is loaded in torch.bfloat16"
    assert lines[-1] == "head.bias is loaded in torch.bfloat16"
    assert len(lines) == 11 and lines == param_dtype_lines(cast_model(dummy, "bf16"))


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.head = nn.Linear(4, 10, bias=False)
        self.head.weight = self.embed.weight  # tied, as in GPT-2
        self.register_buffer("position_ids", torch.arange(5))


def test_tied_weights_are_listed_twice_and_counted_once():
    model = Tied()
    info = inspect_model(model)
    names = [t.name for t in info.tensors]
    assert names == ["embed.weight", "head.weight", "position_ids"]
    assert info.tensors[1].shares_with == "embed.weight"
    assert info.shared_groups == {"embed.weight": ["head.weight"]}
    expected = 10 * 4 * 4 + 5 * 8  # one float32 matrix + int64 buffer
    assert info.footprint_bytes == expected
    assert expected == sum(p.numel() * p.element_size() for p in [*model.parameters(), *model.buffers()])


def test_buffers_are_reported_with_their_kind():
    info = inspect_model(Tied())
    assert info.tensors[-1].kind == "buffer" and info.tensors[-1].dtype == "int64"
    assert {s.dtype for s in info.by_dtype} == {"float32", "int64"}


def test_renders_as_text_html_and_json(dummy):
    info = inspect_model(dummy)
    assert "token_embedding.weight" in info.to_text() and "footprint: 120 bytes" in info.to_text()
    html = info._repr_html_()  # what Jupyter shows
    assert html.startswith("<b>Tensors</b><table>") and "<td>token_embedding.weight</td>" in html
    assert '"footprint_bytes": 120' in info.to_json()


# --- Real models: the footprint is the one transformers reports ------------------------------------

HF_FORMATS = ["fp32", "fp16", "bf16"]


@pytest.mark.parametrize("fmt", HF_FORMATS)
@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
def test_footprint_equals_transformers_get_memory_footprint(name, fmt):
    pytest.importorskip("transformers")
    model = load(name, fmt).model
    assert inspect_model(model).footprint_bytes == model.get_memory_footprint()


@pytest.mark.parametrize("fmt", HF_FORMATS)
def test_minilm_footprint_equals_transformers(minilm, fmt):
    model = minilm.model if fmt == "fp32" else cast_model(minilm.model, fmt)
    info = inspect_model(model)
    assert info.footprint_bytes == model.get_memory_footprint()
    # 22,713,216 weights (the model card's 22.7 M) plus two int64 (1, 512) buffers
    assert info.float32_bytes == 22_713_216 * 4 + 2 * 512 * 8


def test_footprint_of_a_sharded_folder_equals_transformers(sharded_llama_folder):
    model = load(str(sharded_llama_folder), "bf16").model
    assert inspect_model(model).footprint_bytes == model.get_memory_footprint()


def test_bytes_per_dtype_and_ratio_to_float32(dummy):
    kept = cast_model(dummy, "fp16", KeepPolicy(("LayerNorm",)))
    info = inspect_model(kept)
    by_dtype = {s.dtype: s.nbytes for s in info.by_dtype}
    # LayerNorms: 2 x (2 weights + 2 biases) = 8 float32 values; the other 22 weights in fp16
    assert by_dtype == {"float16": 22 * 2, "float32": 8 * 4}
    assert info.float32_bytes == 120 and info.ratio_to_float32 == (44 + 32) / 120
    assert "0.633 x float32 (120 bytes)" in info.to_text()


def test_integer_buffers_count_as_they_are_in_the_float32_reference():
    model = nn.Linear(2, 2).half()
    model.register_buffer("ids", torch.zeros(4, dtype=torch.int64))
    info = inspect_model(model)
    assert info.float32_bytes == 6 * 4 + 32 and info.footprint_bytes == 6 * 2 + 32


def test_pickled_state_dict_inspected_only_with_the_flag(tmp_path, dummy):
    path = tmp_path / "weights.pt"
    torch.save(dummy.state_dict(), path)
    with pytest.raises(ModelSpecError, match="--allow-pickle"):
        inspect(str(path))
    info = inspect(str(path), allow_pickle=True)
    assert info.footprint_bytes == 120 and [t.kind for t in info.tensors] == ["tensor"] * 11


def test_a_folder_of_pickles_without_config_is_inspected_not_sent_back_to_inspect(tmp_path, dummy):
    torch.save(dummy.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(ModelSpecError, match="--allow-pickle"):
        inspect(str(tmp_path))
    assert inspect(str(tmp_path), allow_pickle=True).footprint_bytes == 30 * 4  # 30 float32 weights


def test_pickle_holding_code_is_refused_by_weights_only(tmp_path, dummy):
    path = tmp_path / "model.pt"
    torch.save(dummy, path)  # a whole module: weights_only=True will not unpickle it
    with pytest.raises(CheckpointError, match="weights_only=True"):
        inspect(str(path), allow_pickle=True)


class OneInnerTensor(torch.Tensor):
    """A stand-in for a quantized subclass that keeps all its bytes in a single inner int8 tensor."""

    def __tensor_flatten__(self):
        return ["codes"], None


def test_a_subclass_with_one_inner_tensor_is_inspected_not_compared_elementwise():
    model = nn.Module()
    model.weight = nn.Parameter(torch.zeros(4).as_subclass(OneInnerTensor), requires_grad=False)
    model.weight.codes = torch.zeros(4, dtype=torch.int8)
    row = inspect_model(model).tensors[0]
    assert (row.dtype, row.nbytes) == ("int8", 4)
    assert param_dtype_lines(model) == ["weight is loaded in torch.float32 (stored as int8, 4 bytes)"]


def test_empty_buffers_do_not_share_storage():
    model = nn.Module()
    model.register_buffer("a", torch.empty(0))
    model.register_buffer("b", torch.empty(0))
    assert inspect_model(model).shared_groups == {}


@pytest.mark.parametrize("spec", ["int4:g128", "int8", "nvfp4", "int4:g64:asym"])
def test_a_quantized_model_is_measured_against_its_float32_original(spec):
    """Packed codes stand for the float32 weight, scales for nothing: the float32 reference of a
    quantized model is the original model's own footprint."""
    from dtypelab import quantize_model

    torch.manual_seed(0)
    original = nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 128))
    quantized = inspect_model(quantize_model(original, spec).model)
    assert quantized.float32_bytes == inspect_model(original).footprint_bytes == (256 * 512 + 512 * 128
                                                                                  + 512 + 128) * 4
    assert quantized.ratio_to_float32 == quantized.footprint_bytes / quantized.float32_bytes < 0.3


def test_inspect_says_what_a_checkpoint_of_the_model_holds_beside_its_memory():
    from dtypelab.models import inspect as inspect_spec

    info = inspect_spec("tiny-llama", "bf16")
    # rotary inv_freq / original_inv_freq (head dim 64: 32 frequencies each, kept float32 as transformers
    # keeps them) are computed buffers: in memory, not on disk
    assert info.footprint_bytes - info.stored_bytes == 2 * 32 * 4
    summary = [(s.dtype, s.numel) for s in info.by_dtype]
    assert summary == [("bfloat16", info.stored_bytes // 2), ("float32", 64)]
    assert f"in a checkpoint: {info.stored_bytes:,} bytes" in info.to_text()
