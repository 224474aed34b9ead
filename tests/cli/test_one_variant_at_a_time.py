"""compare and compare --layers build, measure and drop the variants one at a time: when a variant is
built, no earlier variant's model is alive any more (peak memory: the reference plus one variant)."""

from __future__ import annotations

import weakref

import pytest

from dtypelab.variants import build
from helpers import run_cli


@pytest.fixture
def alive_at_each_build(monkeypatch) -> list[int]:
    """How many variant models built earlier are still alive (referenced anywhere) as each build starts."""
    alive: weakref.WeakSet = weakref.WeakSet()
    counts: list[int] = []
    real = build.build_variant

    def counting(*args, **kwargs):
        counts.append(len(alive))  # no gc.collect(): the models must be freed by reference counting
        variant = real(*args, **kwargs)
        if variant.model is not None:
            alive.add(variant.model)
        return variant

    monkeypatch.setattr(build, "build_variant", counting)
    return counts


@pytest.mark.parametrize("mode", [(), ("--layers",)])
def test_each_variant_is_dropped_before_the_next_is_built(capsys, alive_at_each_build, mode):
    code, out, err = run_cli(capsys, "compare", "dummy", "--to", "fp16,bf16,int8,fp8_e4m3", *mode)
    assert code == 0, err
    assert alive_at_each_build == [0, 0, 0, 0]  # four builds, none of them beside an earlier variant
    assert all(name in out for name in ("fp16", "bf16", "int8", "fp8_e4m3"))  # and all four measured
