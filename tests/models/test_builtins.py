"""The seed notebook's printed numbers are the first acceptance test."""

import copy

import pytest
import torch

from dtypelab import cast_model
from dtypelab.analysis import max_abs_diff, mean_abs_diff
from dtypelab.errors import InputError, ModelSpecError
from dtypelab.models import DummyModel, build_model, validate_token_ids

# What the seed notebook printed for ``logits_fp32`` / ``logits_fp16`` / ``logits_bf16``, verbatim.
NOTEBOOK_LOGITS = {
    "fp32": """tensor([[[-0.6872,  0.7132],
         [-0.6872,  0.7132],
         [-0.6872,  0.7132]]], grad_fn=<ViewBackward0>)""",
    "fp16": """tensor([[[-0.6870,  0.7134],
         [-0.6870,  0.7134],
         [-0.6870,  0.7134]]], dtype=torch.float16, grad_fn=<ViewBackward0>)""",
    "bf16": """tensor([[[-0.6875,  0.7148],
         [-0.6875,  0.7148],
         [-0.6875,  0.7148]]], dtype=torch.bfloat16, grad_fn=<ViewBackward0>)""",
}


def test_dummy_layer_names_match_the_notebook(dummy):
    names = [name for name, _ in dummy.named_children()]
    assert names == ["token_embedding", "linear_1", "layernorm_1", "linear_2", "layernorm_2", "head"]


def test_dummy_is_deterministic_and_leaves_global_rng_alone():
    torch.manual_seed(7)
    expected_next = torch.rand(1)
    torch.manual_seed(7)
    a, b = DummyModel(), DummyModel()
    assert torch.rand(1) == expected_next  # construction did not consume or reseed the global RNG
    for (_, pa), (_, pb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(pa, pb)


@pytest.mark.parametrize("fmt", ["fp32", "fp16", "bf16"])
def test_seed_logits_print_as_in_the_notebook(dummy, seed_input, fmt):
    model = dummy if fmt == "fp32" else cast_model(dummy, fmt)
    assert str(model(seed_input)) == NOTEBOOK_LOGITS[fmt]


def test_cast_model_equals_the_notebooks_fp16_route(dummy, seed_input):
    # The notebook builds its fp16 model as DummyModel().half(); the weights are the same (seeded).
    with torch.no_grad():
        assert torch.equal(DummyModel().half()(seed_input), cast_model(dummy, "fp16")(seed_input))


def test_seed_diff_line_to_the_last_digit(dummy, seed_input):
    # The notebook deep-copies the fp32 model and casts it with .to(torch.bfloat16).
    notebook_bf16 = copy.deepcopy(dummy).to(torch.bfloat16)
    ours = cast_model(dummy, "bf16")
    with torch.no_grad():
        ref, theirs, mine = dummy(seed_input), notebook_bf16(seed_input), ours(seed_input)
    assert torch.equal(theirs, mine)
    assert mean_abs_diff(ref, mine) == 0.0009978810558095574
    assert max_abs_diff(ref, mine) == 0.0016907453536987305


def test_build_model_rejects_unknown_names():
    with pytest.raises(ModelSpecError, match="use a built-in"):
        build_model("no-such-model")
    with pytest.raises(ModelSpecError, match="cannot import"):
        build_model("no_such_module_xyz:factory")


def test_build_model_from_explicit_factory():
    model = build_model("dtypelab.models:DummyModel")
    assert isinstance(model, DummyModel) and not model.training


def test_token_ids_outside_vocabulary(dummy):
    with pytest.raises(InputError, match="from 0 to 1"):
        validate_token_ids(dummy, torch.tensor([[0, 2]]))
    validate_token_ids(dummy, torch.tensor([[0, 1]]))


def test_negative_token_id_is_named():
    with pytest.raises(InputError, match="token id -1 is outside the vocabulary"):
        validate_token_ids(DummyModel(), torch.tensor([[0, -1]]))


@pytest.mark.parametrize(("spec", "match"), [
    ("dtypelab.models.builtins:TINY_LM_SEED", "is not callable"),
    ("dtypelab.models:builtin_names", "returned list, not a torch.nn.Module"),
    ("dtypelab.models:no_such_factory", "cannot import factory"),
])
def test_factory_specs_that_do_not_build_a_module(spec, match):
    with pytest.raises(ModelSpecError, match=match):
        build_model(spec)


class NoEmbeddingLookup(DummyModel):
    def get_input_embeddings(self):
        raise NotImplementedError("as transformers raises for models it cannot resolve")


def test_vocabulary_check_falls_back_when_get_input_embeddings_raises():
    with pytest.raises(InputError, match="from 0 to 1"):
        validate_token_ids(NoEmbeddingLookup(), torch.tensor([[0, 2]]))
