"""The HTML report: every view from a real result's JSON, escaping, the size, atomic writes, the CLI.

Truth: the documents the commands print with --json (the report must show their numbers), the HTML
and SVG grammar (parsed back with the standard library's parser), and the option rules of the issue.
"""

from __future__ import annotations

import html.parser
import json

import pytest

from dtypelab.report import render_document, render_fragment, write_html
from dtypelab.report.html import log_ticks, nice_ticks
from helpers import run_cli

LAYERS = ["--text-set", "evaluation", "--ctx", "64", "--windows", "1"]
RANK = ["--text-set", "calibration", "--ctx", "64", "--windows", "1"]


class _Elements(html.parser.HTMLParser):
    """Counts start tags and collects text; fails on a tag closed out of order."""

    VOID = {"meta", "br", "img", "input", "link", "hr", "line", "circle", "rect", "polyline", "path"}

    def __init__(self) -> None:
        super().__init__()
        self.counts: dict[str, int] = {}
        self.stack: list[str] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.counts[tag] = self.counts.get(tag, 0) + 1
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag, attrs):
        self.counts[tag] = self.counts.get(tag, 0) + 1

    def handle_endtag(self, tag):
        if tag in self.VOID:
            return
        if not self.stack or self.stack[-1] != tag:
            raise AssertionError(f"</{tag}> closes {self.stack[-1:] or 'nothing'}")
        self.stack.pop()

    def handle_data(self, data):
        self.text.append(data)


def parsed(text: str) -> _Elements:
    elements = _Elements()
    elements.feed(text)
    elements.close()
    assert elements.stack == []
    return elements


def _json(capsys, *argv) -> dict:
    code, out, err = run_cli(capsys, *argv, "--json")
    assert code == 0, err
    return json.loads(out)


def test_layers_chart_draws_every_layer_the_floor_the_threshold_and_the_first_crossing(documents):
    doc = documents["layers"]
    page = render_document(doc)
    elements = parsed(page)
    variant = doc["variants"][0]
    rows = variant["rows"]
    assert elements.counts["svg"] >= len(doc["variants"]) and elements.counts["polyline"] >= 2
    # each layer's SQNR is a point with its number in the tooltip (the report shows the JSON's numbers)
    first = rows[3]
    assert f"{first['name']}: " in page and f"{first['metrics']['sqnr_db']:.4g}" in page
    assert f"threshold {doc['threshold_db']:g} dB" in page
    if variant["first_crossing"]:
        assert f"first below {doc['threshold_db']:g} dB: {variant['first_crossing']}" in page


def test_every_kind_renders_its_chart_and_tables(documents, plan_documents):
    docs = {**documents, **plan_documents}
    expected = {"comparison": "SQNR of the output", "layers": "SQNR by layer", "headroom": "headroom bits",
                "conversion": "Damaged tensors", "sensitivity": "Predicted damage",
                "plan": "Format per layer group", "plan-sweep": "Checkpoint bytes against"}
    for kind, words in expected.items():
        page = render_document(docs[kind])
        elements = parsed(page)
        assert words in page, kind
        assert elements.counts.get("svg", 0) >= 1 and elements.counts.get("table", 0) >= 2, kind
    assert "(log scale)" in render_document(docs["sensitivity"])  # damages span decades: a log axis
    strip_cells = render_document(docs["plan"]).count('class="cell"')
    assert strip_cells == len(docs["plan"]["rows"])
    bars = render_document(docs["headroom"])
    assert all(f"{r['headroom_bits']:.4g}" in bars for r in docs["headroom"]["rows"] if r["headroom_bits"])


def test_a_causal_lm_comparison_shows_the_next_token_report(documents):
    page = render_fragment(documents["comparison"])
    assert "Next-token report" in page
    nt = documents["comparison"]["variants"][1]["next_token"]
    assert f"{nt['kl_mean']:.4g}" in page


def test_names_are_text_never_markup():
    hostile = '<script>alert("x")</script> & "quoted" \'single\' </script><b>'
    doc = {"schema": "dtypelab/layers/1", "dtypelab_version": "0", "threshold_db": 20.0, "mode": "isolated",
           "variants": [{"name": hostile, "first_crossing": hostile, "verdict": hostile,
                         "rows": [{"name": hostile, "module_type": hostile, "metrics": {"sqnr_db": 10.0},
                                   "floor_db": 30.0, "verdict": "x"}]}]}
    page = render_document(doc, {"command": hostile})
    elements = parsed(page)
    assert elements.counts["script"] == 1  # the sorter: nothing injected
    assert elements.counts.get("b", 0) == 0
    assert hostile in "".join(elements.text)  # shown as the text it is


def test_a_30_layer_report_stays_small(documents):
    doc = json.loads(json.dumps(documents["layers"]))
    rows = doc["variants"][0]["rows"]
    doc["variants"][0]["rows"] = (rows * (30 * 12 // len(rows) + 1))[:30 * 12]  # 30 blocks x 12 modules
    size = len(render_document(doc).encode())
    assert size < 500_000, size  # measured 0.27 MB: one variant of 360 modules, one of 31


def test_write_is_whole_or_absent(tmp_path, documents, monkeypatch):
    """A report is written to a temporary sibling and renamed: a failure at the rename (the last step)
    leaves neither the report nor the temporary file."""
    target = tmp_path / "r.html"
    assert write_html(target, documents["comparison"]) == target.stat().st_size

    def fail(self, other):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(type(target), "replace", fail)
    with pytest.raises(OSError, match="No space"):
        write_html(tmp_path / "other.html", documents["comparison"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.html"]


def test_ticks_are_round_numbers():
    assert nice_ticks(12.6, 63.4) == [20, 40, 60]
    assert nice_ticks(0, 0.0123) == [0.0, 0.005, 0.01]
    assert log_ticks(1.2e6, 2.6e6) == [2e6]
    assert log_ticks(3e5, 8e6) == [5e5, 1e6, 2e6, 5e6]


# ------------------------------------------------------------------------------------------------ CLI

def test_html_option_writes_the_report_of_what_was_printed(tmp_path, capsys):
    target = tmp_path / "c.html"
    code, out, err = run_cli(capsys, "compare", "dummy", "--to", "fp16,bf16", "--html", target)
    assert code == 0, err
    page = target.read_text()
    assert "dtypelab compare dummy --to fp16,bf16 --html" in page  # the run's facts: the command
    assert "torch" in page and "UTC" in page


def test_html_is_checked_before_any_work(tmp_path, capsys):
    code, _, err = run_cli(capsys, "compare", "no-such-model-at-all", "--to", "fp16", "--html",
                           tmp_path / "x.pdf")
    assert code == 2 and "--html" in err and ".html" in err and "no-such-model" not in err
    code, _, err = run_cli(capsys, "headroom", "dummy", "--to", "fp16", "--html",
                           tmp_path / "nope" / "x.html")
    assert code == 2 and "--html" in err
    assert list(tmp_path.iterdir()) == []


def test_report_renders_a_saved_result_and_refuses_what_is_not_one(tmp_path, capsys, documents):
    saved = tmp_path / "layers.json"
    saved.write_text(json.dumps(documents["layers"]))
    code, out, err = run_cli(capsys, "report", saved, "-o", tmp_path / "layers.html")
    assert code == 0 and "layers.html" in out, err
    assert "SQNR by layer" in (tmp_path / "layers.html").read_text()
    cases = {"not json": "{", "no schema": '{"a": 1}', "newer": json.dumps({**documents["layers"],
                                                                          "schema": "dtypelab/layers/99"}),
             "unknown kind": '{"schema": "dtypelab/teapot/1"}'}
    for name, text in cases.items():
        bad = tmp_path / f"{name}.json"
        bad.write_text(text)
        code, _, err = run_cli(capsys, "report", bad, "-o", tmp_path / f"{name}.html")
        assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, name
        assert not (tmp_path / f"{name}.html").exists(), name
