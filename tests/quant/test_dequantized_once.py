"""``dequantized_once`` (issue 16 item 4): a measurement run's QuantizedLinear layers dequantize their weight
once, within a memory budget, with outputs bit for bit those of the per-call path (``torch.equal``: no
tolerance), and nothing is held once the context closes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dtypelab.errors import InputError
from dtypelab.quant import QuantizedLinear, dequantized_once, quantize_model

SPECS = ["int8", "int4:g64", "nf4", "nvfp4", "int4:g64:asym", "int8:a8"]
SHAPES = [(256, 128), (128, 256), (64, 128)]  # (out, in) of the three layers below
BATCHES = 3  # forwards per run: the cache must serve the second and third


def model_in(spec: str, dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(0)
    dense = nn.Sequential(nn.Linear(128, 256), nn.GELU(), nn.Linear(256, 128), nn.Linear(128, 64)).to(dtype)
    model = quantize_model(dense, spec).model.eval()
    assert sum(isinstance(m, QuantizedLinear) for m in model.modules()) == 3
    return model


def batches(dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(5, 7, 128, generator=g).to(dtype) for _ in range(BATCHES)]


def run(model: nn.Module, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    with torch.no_grad():
        return [model(x) for x in inputs]


@pytest.mark.parametrize("spec", SPECS)
def test_outputs_with_the_cache_are_the_per_call_outputs_bit_for_bit(spec, dequantize_calls):
    model, inputs = model_in(spec), batches()
    per_call = run(model, inputs)
    assert dequantize_calls[0] == 3 * BATCHES
    with dequantized_once(model) as held:
        cached = run(model, inputs)
        assert held.held_bytes == sum(o * i * 4 for o, i in SHAPES)  # every float32 weight, once
    assert dequantize_calls[0] == 3 * BATCHES + 3  # one dequantization per layer for all batches
    assert len(held.cached) == 3 and held.per_call == []
    for a, b in zip(per_call, cached, strict=True):
        assert torch.equal(a, b)


def test_bf16_layers_cache_in_bf16_and_match(dequantize_calls):
    model, inputs = model_in("int4:g64", torch.bfloat16), batches(torch.bfloat16)
    per_call = run(model, inputs)
    with dequantized_once(model) as held:
        cached = run(model, inputs)
        assert held.held_bytes == sum(o * i * 2 for o, i in SHAPES)  # bf16: 2 bytes a weight
    assert all(torch.equal(a, b) for a, b in zip(per_call, cached, strict=True))


def test_the_cache_is_empty_after_the_context_even_after_an_error(dequantize_calls):
    model, inputs = model_in("int4:g64"), batches()
    with pytest.raises(RuntimeError, match="stop"), dequantized_once(model) as held:
        run(model, inputs)
        assert held.held_bytes > 0
        raise RuntimeError("stop")
    assert held.held_bytes == 0
    assert not any("_dequantized_once" in m.__dict__ for m in model.modules())
    before = dequantize_calls[0]
    run(model, inputs)  # back on the per-call path
    assert dequantize_calls[0] == before + 3 * BATCHES


def test_a_budget_of_zero_caches_nothing(dequantize_calls):
    model, inputs = model_in("int8"), batches()
    with dequantized_once(model, budget_bytes=0) as held:
        run(model, inputs)
        assert held.held_bytes == 0
    assert held.cached == [] and len(held.per_call) == 3 and held.reserved_bytes == 0
    assert dequantize_calls[0] == 3 * BATCHES


def test_the_budget_bounds_what_is_held(dequantize_calls):
    """A budget one byte short of the first two layers caches the first and the third (which fits in
    what is left), never more bytes than the budget, and the second runs per call with equal outputs."""
    model, inputs = model_in("nvfp4"), batches()
    first, second, third = (o * i * 4 for o, i in SHAPES)
    budget = first + second - 1
    per_call = run(model, inputs)
    calls = dequantize_calls[0]
    with dequantized_once(model, budget_bytes=budget) as held:
        cached = run(model, inputs)
        assert held.held_bytes == first + third <= budget
    assert held.cached == ["0", "3"] and held.per_call == ["2"]
    assert held.reserved_bytes == first + third
    assert dequantize_calls[0] == calls + 2 + BATCHES  # two once, the middle one every batch
    assert all(torch.equal(a, b) for a, b in zip(per_call, cached, strict=True))


def test_an_inner_context_leaves_the_outer_ones_cache(dequantize_calls):
    model, inputs = model_in("int4:g64"), batches()
    with dequantized_once(model) as outer:
        run(model, inputs)
        with dequantized_once(model) as inner:
            run(model, inputs)
        assert inner.cached == [] and outer.held_bytes > 0
        run(model, inputs)
    assert dequantize_calls[0] == 3  # the outer cache served all nine forwards of each layer


def test_inputs_in_another_dtype_run_per_call_and_never_exceed_the_budget(dequantize_calls):
    """The reservation is for the layer's compute dtype: a float64 input is dequantized per call."""
    model = model_in("int8")
    x = batches()[0].double()
    expected = run(model, [x])[0]
    with dequantized_once(model) as held:
        out = run(model, [x, x])
        assert held.held_bytes == 0
    assert torch.equal(out[0], expected) and torch.equal(out[1], expected)


def test_a_negative_budget_is_refused():
    with pytest.raises(InputError, match="budget_bytes"), dequantized_once(model_in("int8"), budget_bytes=-1):
        pass
