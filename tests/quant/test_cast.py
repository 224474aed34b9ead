import pytest
import torch
from torch import nn

from dtypelab import KeepPolicy, NumberFormat, cast_model, get_format
from dtypelab.errors import InputError, UnknownFormatError
from dtypelab.formats import parse_format_list

ALIASES = {
    "fp32": torch.float32, "float32": torch.float32, "torch.float32": torch.float32, "float": torch.float32,
    "fp16": torch.float16, "half": torch.float16, "float16": torch.float16, "torch.float16": torch.float16,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "torch.bfloat16": torch.bfloat16,
    "BF16": torch.bfloat16,
}


@pytest.mark.parametrize(("alias", "dtype"), ALIASES.items())
def test_aliases_resolve(dummy, alias, dtype):
    assert get_format(alias).torch_dtype is dtype
    assert get_format(dtype).torch_dtype is dtype  # a torch.dtype itself is accepted
    assert cast_model(dummy, alias).head.weight.dtype is dtype


def test_unknown_format_names_the_choices():
    with pytest.raises(UnknownFormatError, match="unknown dtype or format 'fp17'.*fp16"):
        get_format("fp17")
    with pytest.raises(UnknownFormatError, match="empty item"):
        parse_format_list("fp16,,bf16")


@pytest.mark.parametrize("fmt", ["fp16", "bf16"])
def test_original_is_untouched(dummy, fmt):
    before = {n: (t.clone(), t.dtype, t.data_ptr()) for n, t in dummy.state_dict().items()}
    cast = cast_model(dummy, fmt)
    for name, tensor in dummy.state_dict().items():
        value, dtype, ptr = before[name]
        assert tensor.dtype == dtype and tensor.data_ptr() == ptr and torch.equal(tensor, value)
    shared = {t.data_ptr() for t in cast.state_dict().values()} & {p for _, _, p in before.values()}
    assert not shared  # the copy owns all of its storage


@pytest.mark.parametrize("fmt", ["fp32", "fp16", "bf16"])
def test_values_equal_torchs_own_cast(dummy, fmt):
    dtype = get_format(fmt).torch_dtype
    cast = cast_model(dummy, fmt)
    for name, tensor in dummy.state_dict().items():
        assert torch.equal(cast.state_dict()[name], tensor.to(dtype))


class WithBuffers(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(8, 4)
        self.norm = nn.LayerNorm(4)
        self.head = nn.Linear(4, 8, bias=False)
        self.head.weight = self.embed.weight
        self.register_buffer("position_ids", torch.arange(3))
        self.register_buffer("scale", torch.tensor(0.5))

    def forward(self, ids):
        return self.head(self.norm(self.embed(ids)) * self.scale)  # (batch, seq, vocab)


def test_floating_buffers_follow_integer_buffers_do_not():
    cast = cast_model(WithBuffers(), "bf16")
    assert cast.scale.dtype == torch.bfloat16
    assert cast.position_ids.dtype == torch.int64 and torch.equal(cast.position_ids, torch.arange(3))


def test_tied_weights_stay_tied():
    cast = cast_model(WithBuffers(), "fp16")
    assert cast.head.weight is cast.embed.weight


def test_no_float32_copy_of_the_weights_is_made(monkeypatch):
    """The module tree is deep-copied but every tensor comes from the memo, already cast."""

    def refuse(self, memo):
        raise AssertionError("a tensor was deep-copied in its original dtype")

    monkeypatch.setattr(torch.Tensor, "__deepcopy__", refuse)
    monkeypatch.setattr(nn.Parameter, "__deepcopy__", refuse)
    assert cast_model(WithBuffers(), "bf16").embed.weight.dtype == torch.bfloat16


@pytest.mark.parametrize("keep", [KeepPolicy(("LayerNorm",)), KeepPolicy(module_types=(nn.LayerNorm,)),
                                  KeepPolicy(name_patterns=("layernorm_*",)),
                                  KeepPolicy.from_strings(["LayerNorm"])])
def test_keep_policy_keeps_layernorm_and_forward_runs(dummy, seed_input, keep):
    cast = cast_model(dummy, "fp16", keep)
    assert cast.layernorm_1.weight.dtype == torch.float32 and cast.linear_1.weight.dtype == torch.float16
    with torch.no_grad():
        out, ref = cast(seed_input), dummy(seed_input)
    assert out.dtype == torch.float16  # outputs return to the model's dtype after kept modules
    # A 2-wide LayerNorm outputs ±gamma + beta whatever small error its input carries, so the error is
    # the fp16 head's: 3 terms (2 products + bias), each through at most 4 roundings of eps/2 (input,
    # weight, product, sum). The terms' magnitudes add up to under 2 |ref| (checked), so
    # |error| <= 4 * eps/2 * 2 |ref| = 4 eps |ref|.
    with torch.no_grad():
        hidden = dummy.layernorm_2(dummy.linear_2(dummy.layernorm_1(dummy.linear_1(dummy.token_embedding(
            seed_input)))))  # (batch, seq, 2), the head's input in float32
        magnitudes = hidden.abs() @ dummy.head.weight.abs().T + dummy.head.bias.abs()  # (batch, seq, 2)
    assert (magnitudes <= 2 * ref.abs()).all()
    assert ((out.float() - ref).abs() <= 4 * get_format("fp16").eps * ref.abs()).all()


def test_keep_by_name_keeps_submodules_too():
    model = nn.Sequential(nn.Linear(4, 4), nn.Sequential(nn.Linear(4, 4), nn.ReLU()), nn.Linear(4, 2))
    cast = cast_model(model, "bf16", KeepPolicy(name_patterns=("1",)))
    assert cast[1][0].weight.dtype == torch.float32 and cast[0].weight.dtype == torch.bfloat16
    out = cast(torch.randn(3, 4, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16 and out.shape == (3, 2)


def test_cast_refuses_storage_only_formats(dummy):
    fp8 = NumberFormat("fp8_e4m3_test", 8, torch.float8_e4m3fn, "an 8-bit storage format")
    with pytest.raises(UnknownFormatError, match="formats are quantized"):
        cast_model(dummy, fp8)


class TiedLM(nn.Module):
    """An embedding tied to its head, as GPT-2 ties ``lm_head`` to ``wte``."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(8, 4)
        self.body = nn.Linear(4, 4)
        self.head = nn.Linear(4, 8, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids):
        return self.head(self.body(self.embed(ids)))  # (batch, seq, vocab)


def test_keeping_a_tied_head_keeps_its_embedding_whole_and_the_forward_runs():
    """The shared weight stays float32, so the embedding holding it is kept too (boundary casts)."""
    model = TiedLM()
    cast = cast_model(model, "fp16", KeepPolicy(name_patterns=("head",)))
    assert cast.head.weight is cast.embed.weight and cast.embed.weight.dtype == torch.float32
    assert cast.body.weight.dtype == torch.float16
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        out = cast(ids)
        # the same computation by hand: float32 embedding, fp16 body, float32 head, whose float32 output
        # is the model's (casts only where a kept region meets a cast one)
        hidden = model.body.half()(model.embed(ids).half()).float()
        expected = nn.functional.linear(hidden, model.embed.weight)
    assert out.dtype == torch.float32 and torch.equal(out, expected)


def test_keeping_everything_gives_one_root():
    model = nn.Sequential(nn.Linear(2, 2), nn.Sequential(nn.Linear(2, 2)))
    assert KeepPolicy(name_patterns=("*",)).kept_roots(model) == [""]


class TakesABatch(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(4)

    def forward(self, batch):
        return self.norm(batch["hidden"])  # (batch, 4)


def test_a_kept_module_does_not_change_the_callers_inputs():
    batch = {"hidden": torch.ones(2, 4, dtype=torch.bfloat16)}
    kept = cast_model(nn.Sequential(TakesABatch()), "bf16", KeepPolicy(name_patterns=("0",)))  # float32
    assert kept(batch).dtype == torch.float32  # the kept output is handed on as computed
    assert batch["hidden"].dtype == torch.bfloat16  # the caller's dict still holds its own tensor


@pytest.mark.parametrize("items", [[""], ["LayerNorm", " "]])
def test_an_empty_keep_item_is_refused_not_a_keep_everything(items):
    with pytest.raises(InputError, match="empty --keep item"):
        KeepPolicy.from_strings(items)


def test_a_shared_integer_buffer_does_not_keep_its_other_holder():
    model = nn.Sequential(nn.LayerNorm(4), nn.Linear(4, 4))
    positions = torch.arange(4)
    model[0].register_buffer("positions", positions)
    model[1].register_buffer("positions", positions)  # integers are copied as they are anyway
    cast = cast_model(model, "bf16", KeepPolicy(("LayerNorm",)))
    assert cast[1].weight.dtype == torch.bfloat16 and cast[0].weight.dtype == torch.float32
    assert cast[0].positions is cast[1].positions


def test_keep_that_matches_nothing_is_refused(dummy):
    with pytest.raises(InputError, match="--keep 'LayerNrom' matches no module"):
        cast_model(dummy, "fp16", KeepPolicy.from_strings(["LayerNrom"]))
    with pytest.raises(InputError, match="--keep 'blocks.9' matches no module"):
        cast_model(dummy, "fp16", KeepPolicy.from_strings(["blocks.9"]))


def test_keep_takes_tensor_names_and_exact_names_with_brackets():
    """convert's tensor names (``0.weight``) name their module; an exact name wins over glob syntax."""
    model = nn.Sequential(nn.Linear(2, 2), nn.ModuleDict({"a[0]": nn.Linear(2, 2)}))
    assert KeepPolicy.from_strings(["0.weight"]).kept_roots(model) == ["0"]
    assert KeepPolicy(name_patterns=("1.a[0]",)).kept_roots(model) == ["1.a[0]"]
