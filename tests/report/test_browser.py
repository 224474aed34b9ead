"""Each kind of HTML report opened in headless Chromium: no request beyond the file itself, no console
error, the expected elements present with JavaScript on and off, the sorter working; a screenshot of each
written for a person to look at (under the test's temporary folder, path printed with -s).

Truth: the browser's own DevTools records (Network.requestWillBeSent, Runtime / Log errors) and DOM.
Skipped, with the reason, where Chromium is not installed (``make test`` installs Debian's package when it
can).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from browser import Browser, find_browser

from dtypelab.report import write_html

pytest.importorskip("websocket", reason="the websocket-client test extra talks to Chromium")
CHROMIUM = find_browser()
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (make test installs "
                                "Debian's chromium package when it can): the browser test cannot run")

QUERIES = {
    "charts": "document.querySelectorAll('svg[role=img]').length",
    "tables": "document.querySelectorAll('table.sortable tbody tr').length",
    "tooltips": "document.querySelectorAll('svg title').length",
    "facts": "document.querySelector('table.facts').textContent",
}
SORT = ("(function(){var t=document.querySelector('table.sortable');var cells=function(){return "
        "Array.prototype.map.call(t.tBodies[0].rows,function(r){return r.cells[{col}].textContent;});};"
        "t.querySelectorAll('th button')[{col}].click();var up=cells();"
        "t.querySelectorAll('th button')[{col}].click();return [up, cells()];})()")


@pytest.fixture(scope="module")
def browser():
    opened = Browser(CHROMIUM)
    yield opened
    opened.close()


@pytest.fixture(scope="module")
def reports(documents, plan_documents, tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("reports")
    paths = {}
    for kind, doc in {**documents, **plan_documents}.items():
        paths[kind] = folder / f"{kind}.html"
        write_html(paths[kind], doc, {"command": f"test {kind}"})
    return paths


@pytest.mark.parametrize("kind", ["comparison", "layers", "headroom", "conversion", "sensitivity", "plan",
                                  "plan-sweep"])
def test_a_report_opens_offline_without_errors(browser, reports, kind):
    path = reports[kind]
    shot = path.with_suffix(".png")
    visit = browser.visit(path, QUERIES, shot)
    print(f"screenshot: {shot}")
    assert visit.requests == [path.resolve().as_uri()], visit.requests  # the file itself, nothing else
    assert visit.errors == []
    assert visit.answers["charts"] >= 1 and visit.answers["tables"] >= 1 and visit.answers["tooltips"] >= 1
    assert f"test {kind}" in visit.answers["facts"]  # the run's facts, first on the page
    assert shot.stat().st_size > 10_000  # a rendered page, not a blank one
    quiet = browser.visit(path, {k: QUERIES[k] for k in ("charts", "tables")}, javascript=False)
    assert quiet.answers == {k: visit.answers[k] for k in ("charts", "tables")}  # nothing needs the script
    assert quiet.errors == [] and quiet.requests == visit.requests


def test_clicking_a_header_sorts_numbers_as_numbers(browser, reports):
    """The conversion table's numel column (ints with separators) sorts by value up, then down."""
    path = reports["conversion"]
    visit = browser.visit(path, {"sorted": SORT.replace("{col}", "3")})
    up, down = visit.answers["sorted"]
    as_numbers = [int(v.replace(",", "")) for v in up]
    assert as_numbers == sorted(as_numbers) and down == list(reversed(up)), up
