"""Rendering: cell formats, text alignment, escaped HTML and strict JSON, each checked by hand."""

import json
import math
import re
from dataclasses import dataclass, field

import pytest
import torch

import dtypelab
from dtypelab.errors import InputError
from dtypelab.report import Table, TableMixin, format_cell, tables_text, to_jsonable


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


# --- Terminal tables: chosen columns, a width to fit, colour ----------------------------------------------

def _wide() -> Table:
    return Table("T", ["variant", "bytes", "sqnr_db", "status"],
                 [["bf16", 60, 55.2, "ok"], ["int4:g129", None, None, "failed: " + "group size 129; " * 6]],
                 ["a note"], default_columns=["variant", "sqnr_db", "status"])


def test_the_default_columns_and_a_note_naming_the_rest():
    shown = _wide().with_columns(None)
    assert shown.columns == ["variant", "sqnr_db", "status"] and shown.rows[0] == ["bf16", 55.2, "ok"]
    assert shown.notes == ["a note", "1 more column(s) not shown: bytes (--columns all or --json shows them)"]
    assert _wide().with_columns(("all",)).columns == _wide().columns  # all: every column, no note
    assert Table("U", ["a", "b"], [[1, 2]]).with_columns(None).columns == ["a", "b"]  # none declared: all


def test_chosen_columns_keep_the_key_column_and_table_order_case_insensitively():
    shown = _wide().with_columns(("STATUS", "bytes"))
    assert shown.columns == ["variant", "bytes", "status"] and len(shown.notes) == 1  # no left-out note
    assert _wide().with_columns(("kl_div",)) is None  # a table holding none of them is left out


def test_an_unknown_column_names_the_closest_one():
    second = Table("Next", ["variant", "kl_div"], [["bf16", 0.1]])
    assert "kl_div" in tables_text([_wide(), second], ("kl_div",))  # known to one table of several: fine
    with pytest.raises(InputError, match=r"unknown column 'sqnr' \(did you mean 'sqnr_db'\?\): choose among "
                                         r"variant, bytes, sqnr_db, status, kl_div, or all"):
        tables_text([_wide(), second], ("variant", "sqnr"))


def test_a_narrow_width_turns_the_long_reason_into_a_note_and_wraps_notes():
    reason = "failed: group size 129 does not divide the row length of 256"  # 60 < LONG_CELL characters
    table = Table("T", ["variant", "status"], [["a.very.long.module.name.without.spaces", "ok"],
                                               ["int4:g129", reason], ["int4:g127", reason]],
                  ["a note that is long enough to wrap at forty characters for sure"])
    lines = table.to_text(width=50).splitlines()
    assert max(len(line) for line in lines) <= 50
    assert lines[3] == "a.very.long.module.name.without.spaces  ok"  # names are never cut
    assert lines[4] == "int4:g129                               failed [1]"  # both rows share one note
    assert lines[5] == "int4:g127                               failed [1]"
    assert lines[6:8] == ["a note that is long enough to wrap at forty", "    characters for sure"]
    assert lines[8].startswith("[1] failed: group size 129") and len(lines) == 10  # one note, wrapped
    assert table.to_text().splitlines()[4].endswith(reason)  # without a width: cut only past LONG_CELL


def test_style_marks_the_header_failed_rows_and_status_warnings():
    table = Table("T", ["layer", "sqnr_db", "verdict"], [["a", 40.0, "within format noise"],
                                                         ["b", 9.0, "degraded"], ["c", None, "failed: x"]])
    styled = table.to_text(style=lambda text, role: f"<{role}>{text}</{role}>")
    assert re.sub(r"</?\w+>", "", styled) == table.to_text()  # styles never move a column
    lines = styled.splitlines()
    assert lines[1] == "<header>layer</header>  <header>sqnr_db</header>  <header>verdict</header>"
    assert "<" not in lines[3]  # within format noise: calm, no style
    assert lines[4].endswith("  <warning>degraded</warning>") and lines[4].startswith("b ")
    assert lines[5].startswith("<failed>c</failed>") and lines[5].endswith("<failed>failed: x</failed>")
