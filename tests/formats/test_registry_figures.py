"""The plain floating formats' figures are data (their IEEE layouts): checked against torch.finfo."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from dtypelab.formats import NumberFormat, get_format
from dtypelab.formats.registry import IEEE_LAYOUTS, SCALE_BITS, SCALE_DTYPES


@pytest.mark.parametrize("name", ["fp32", "fp16", "bf16"])
def test_plain_float_figures_are_torch_finfo(name):
    fmt = get_format(name)
    info = torch.finfo(fmt.torch_dtype)
    assert (fmt.max_finite, fmt.smallest_normal, fmt.eps) == (info.max, info.smallest_normal, info.eps)
    assert fmt.smallest_subnormal == info.smallest_normal * info.eps
    assert fmt.dtype in IEEE_LAYOUTS and fmt.is_floating_point


def test_scale_dtypes_resolve_to_torch_dtypes_of_their_bits():
    assert {key: SCALE_DTYPES[key].itemsize * 8 for key in SCALE_DTYPES} == SCALE_BITS
    assert SCALE_DTYPES["e8m0"] is torch.float8_e8m0fnu


def test_a_torch_dtype_given_to_a_format_is_kept_by_name():
    fmt = NumberFormat("fp8_e4m3_test", 8, torch.float8_e4m3fn, "an 8-bit storage format")
    assert fmt.dtype == "float8_e4m3fn" and fmt.torch_dtype is torch.float8_e4m3fn
    assert get_format(torch.float16).name == "fp16" and not get_format("int4").is_floating_point


def test_the_registry_and_the_formats_table_import_no_torch():
    code = ("import sys; from dtypelab.formats import format_table, get_format; format_table(); "
            "get_format('int4:g64:asym').effective_bits(); print('torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "False", done.stderr
