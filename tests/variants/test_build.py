"""Variants: one way to build them from --to specs, the same rows everywhere, formats carried along."""

from __future__ import annotations

import pytest
from torch import nn

from dtypelab.analysis import compare_layers, compare_models
from dtypelab.errors import UnknownFormatError
from dtypelab.formats import get_format
from dtypelab.variants import Variant, build_variants, iter_variants, parse_variant_specs
from helpers import run_cli


def test_specs_are_validated_before_anything_is_built():
    with pytest.raises(UnknownFormatError, match="bf61"):
        parse_variant_specs("bf16,bf61")
    specs = parse_variant_specs("half,int4:g64:asym,quanto:qint8")
    assert [(s.name, s.is_peer) for s in specs] == [("fp16", False), ("int4:g64:asym", False),
                                                    ("quanto:qint8", True)]
    assert specs[1].format == get_format("int4:g64:asym")


def test_a_variant_carries_its_format_and_a_failure_its_reason(dummy):
    variants = build_variants(dummy, "bf16,int4:g129")
    assert variants["bf16"].ok and variants["bf16"].format == get_format("bf16")
    failed = variants["int4:g129"]
    assert not failed.ok and failed.model is None and failed.format == get_format("int4:g129")
    assert "does not divide" in failed.failure


def test_a_module_passed_by_name_takes_that_formats_name_or_none():
    assert Variant.of("bf16", nn.Linear(2, 2)).format == get_format("bf16")
    assert Variant.of("mine", nn.Linear(2, 2)).format is None


def test_variants_are_built_one_at_a_time(dummy):
    built = iter_variants(dummy, "fp16,bf16")
    first = next(built)
    assert first.name == "fp16" and next(built).name == "bf16"


def test_a_failed_variant_is_a_row_in_compare_and_in_layers(dummy, seed_input):
    variants = list(build_variants(dummy, "bf16,int4:g129").values())
    rows = compare_models(dummy, variants, seed_input).variants
    assert rows[0].failure is None and "does not divide" in rows[1].failure
    layers = compare_layers(dummy, variants, seed_input, noise_floor=False)
    ok, failed = layers.variants
    assert ok.rows and ok.final is not None and failed.rows == [] and failed.final is None
    assert failed.verdict == "failed" and "does not divide" in failed.failure
    assert "int4:g129: failed: nothing to quantize" in layers.to_text()
    assert '"failure": "nothing to quantize with int4:g129' in layers.to_json()


def test_layers_from_the_command_line_keeps_going_past_a_format_that_quantizes_nothing(capsys):
    code, out, err = run_cli(capsys, "compare", "dummy", "--to", "bf16,int4:g129", "--layers",
                             "--input", "[[1, 0, 1]]")
    assert code == 4, err  # a failed variant: the whole result printed, then exit 4
    assert "int4:g129: failed:" in out and "bf16: " in out
