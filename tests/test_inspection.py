import torch
from torch import nn

from dtypelab import cast_model, inspect_model, param_dtype_lines, print_param_dtype


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
    assert info._repr_html_().startswith("<b>Tensors</b><table>")
    assert '"footprint_bytes": 120' in info.to_json()
