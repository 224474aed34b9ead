"""Rendering: cell formats, text alignment, escaped HTML and strict JSON, each checked by hand."""

import json
import math
from dataclasses import dataclass, field

import pytest
import torch

import dtypelab
from dtypelab.report import Table, TableMixin, format_cell, to_jsonable


@pytest.mark.parametrize(("value", "text"), [
    (None, ""), (True, "True"), (1234567, "1,234,567"), (0.5, "0.5"), (123456.0, "1.235e+05"),
    (0.9999123456, "0.9999123"),  # cosines near 1 keep 7 decimals: 4 significant digits would say 0.9999
    (-0.99995, "-0.9999500"), (1.0, "1"), (math.inf, "inf"), (-math.inf, "-inf"), (math.nan, "nan"),
    ("bf16", "bf16"), ([1, 2], "[1, 2]"),
])
def test_format_cell(value, text):
    assert format_cell(value) == text


def test_text_right_aligns_numbers_and_left_aligns_words():
    table = Table("T", ["name", "n"], [["a", 5], ["long", 1234]], ["a note"])
    assert table.to_text().splitlines() == ["T", "name  n", "----  -----", "a         5", "long  1,234",
                                            "a note"]


def test_html_is_escaped():
    html = Table("<T>", ["a&b"], [["<script>"]], ["x < y"]).to_html()
    assert "<script>" not in html and "&lt;script&gt;" in html
    assert "<b>&lt;T&gt;</b>" in html and "<th>a&amp;b</th>" in html and "<br>x &lt; y" in html


@dataclass
class _Result(TableMixin):
    value: float
    nested: dict
    points: tuple
    tensor: torch.Tensor = field(repr=False, default=None)  # left out of JSON, as results' outputs are

    def to_table(self) -> Table:
        return Table("R", ["value"], [[self.value]])


def test_json_is_strict_and_drops_hidden_fields():
    result = _Result(math.nan, {1: math.inf, "k": [1.5, None]}, (2, -math.inf), torch.ones(3))
    text = result.to_json()
    assert json.loads(text) == {"schema": "dtypelab/result/0", "dtypelab_version": dtypelab.__version__,
                                "value": None, "value_status": "nan",
                                "nested": {"1": None, "1_status": "inf", "k": [1.5, None]},
                                "points": [2, None], "points_status": [None, "-inf"]}
    json.loads(text, parse_constant=lambda c: pytest.fail(f"bare {c} in JSON"))  # no NaN / Infinity tokens
    assert to_jsonable(torch.float16) == "torch.float16"  # anything else becomes its string


def test_mixin_renders_every_table():
    result = _Result(0.25, {}, ())
    assert str(result) == result.to_text() == "R\nvalue\n-----\n 0.25"
    assert result._repr_html_().startswith("<b>R</b><table>")


def test_a_long_reason_becomes_a_numbered_note_below_the_table():
    reason = "failed: nothing to quantize with int4:g129: " + "group size 129 does not divide 256; " * 5
    table = Table("T", ["variant", "status"], [["bf16", "ok"], ["int4:g129", reason]], ["compared: x"])
    lines = table.to_text().splitlines()
    assert lines[4:] == ["int4:g129  failed [1]", "compared: x", f"[1] {reason}"]
    assert max(len(line) for line in lines[:4]) < 30  # the table stays narrow
    assert reason in table.to_html()  # HTML and JSON keep the cell whole
