"""The seed notebook's printed numbers are the first acceptance test."""

import copy

import pytest
import torch

from dtypelab import cast_model
from dtypelab.compare import max_abs_diff, mean_abs_diff
from dtypelab.errors import InputError, ModelSpecError
from dtypelab.models import DummyModel, build_model, validate_token_ids

# What the notebook printed (torch shows 4 decimals).
SEED_LOGITS = {"fp32": [-0.6872, 0.7132], "fp16": [-0.6870, 0.7134], "bf16": [-0.6875, 0.7148]}


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
def test_seed_logits_as_printed(dummy, seed_input, fmt):
    model = dummy if fmt == "fp32" else cast_model(dummy, fmt)
    with torch.no_grad():
        logits = model(seed_input)
    assert logits.shape == (1, 3, 2)
    printed = torch.tensor(SEED_LOGITS[fmt]).expand(3, 2)
    # torch prints 4 decimals: the true values round to the printed ones.
    assert torch.equal(torch.round(logits[0].float() * 1e4) / 1e4, torch.round(printed * 1e4) / 1e4)


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
