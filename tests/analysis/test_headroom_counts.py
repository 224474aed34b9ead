"""headroom's shared-pass counting gives exactly the counts of the one damage accounting."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from dtypelab.analysis.headroom import _tensor_finite, count_formats
from dtypelab.formats import get_format
from dtypelab.quant import count_damage, round_trip

FORMATS = [get_format(name) for name in ("fp32", "fp16", "bf16", "fp8_e4m3:cast", "fp8_e5m2:cast")]


def tensors() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    normal = torch.randn(4096)
    with_zeros = normal.clone()
    with_zeros[::7] = 0.0
    tiny = normal * 1e-6  # subnormal / flushed in fp16 and fp8
    huge = normal * 1e5  # overflows fp16 and fp8
    non_finite = normal.clone()
    non_finite[[3, 9]] = torch.tensor([float("inf"), float("nan")])
    return {"normal": normal, "with zeros": with_zeros, "tiny": tiny, "huge": huge,
            "non-finite": non_finite, "zeros": torch.zeros(64), "empty": torch.zeros(0),
            "fp16 activations": normal.half(), "2-D": normal.reshape(64, 64)}


@pytest.mark.parametrize("name", list(tensors()))
def test_counts_are_count_damage_s_for_every_format(name):
    tensor = tensors()[name]
    before = tensor.clone()
    values = tensor.float().reshape(-1)
    expected = [count_damage(values, round_trip(values, fmt), fmt, sums=False) for fmt in FORMATS]
    assert [dataclasses.asdict(c) for c in count_formats(tensor, FORMATS)] == \
        [dataclasses.asdict(c) for c in expected]
    assert torch.equal(tensor, before) or name == "non-finite"  # the activation is never modified
    assert torch.allclose(tensor, before, equal_nan=True)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_finite_check_sees_every_non_finite_value(value, dtype):
    tensor = torch.randn(10_001).to(dtype)
    assert _tensor_finite(tensor) and _tensor_finite(tensor[:0])
    for position in (0, 5_000, 10_000):
        broken = tensor.clone()
        broken[position] = value
        assert not _tensor_finite(broken)
