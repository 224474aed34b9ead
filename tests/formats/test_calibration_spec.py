"""The spec grammar's :gptq / :awq: which formats take them, the names they print, the refusals.

Truth: the grammar as docs/architecture.md states it (calibration is a choice of codes, not of storage).
"""

from __future__ import annotations

import pytest

from dtypelab.errors import UnknownFormatError
from dtypelab.formats import get_format


@pytest.mark.parametrize(("spec", "name"), [
    ("int4:g64:gptq", "int4:g64:gptq"), ("int4:awq", "int4:g128:awq"),
    ("int8:channel:gptq", "int8:channel:gptq"),
    ("int4:g64:mse:gptq", "int4:g64:mse:gptq"), ("int4:gptq:g64:asym", "int4:g64:asym:gptq"),
    ("mxfp4:gptq", "mxfp4:gptq"), ("nvfp4:awq", "nvfp4:awq"), ("fp8_e4m3:gptq", "fp8_e4m3:channel:gptq"),
])
def test_calibrated_specs_name_themselves_and_round_trip(spec, name):
    fmt = get_format(spec)
    assert fmt.name == name
    assert fmt.calibration == ("gptq" if "gptq" in spec else "awq")
    assert get_format(fmt.name) == fmt


def test_calibration_changes_no_storage():
    plain, calibrated = get_format("int4:g64"), get_format("int4:g64:gptq")
    assert calibrated.effective_bits() == plain.effective_bits() and calibrated.bits == plain.bits


@pytest.mark.parametrize(("spec", "words"), [
    ("int4:tensor:gptq", "group or channel"), ("fp8_e4m3:cast:awq", ":cast stores no scale"),
    ("int8:a8:gptq", "weights only"), ("int4:awq:mse", "drop :mse"), ("fp16:gptq", "plain torch dtype"),
    ("int4:gptq:awq", "keep one"), ("int4:g64:gptqq", "unknown option"),
])
def test_bad_combinations_are_refused_with_the_fix(spec, words):
    with pytest.raises(UnknownFormatError, match=words):
        get_format(spec)
