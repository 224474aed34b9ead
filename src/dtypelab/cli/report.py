"""``dtypelab report``: a saved ``--json`` result rendered as the HTML report ``--html`` writes."""

from __future__ import annotations

import json
from pathlib import Path

import click

from ..errors import InputError
from ..report import JSON_KINDS, run_facts, write_html
from .common import check_html, wrote


@click.command("report", short_help="Render a saved --json result as a self-contained HTML report.",
               help="Render RESULT.json (what a command printed with --json) as the HTML report its --html "
               "option writes: one file, charts and sortable tables, no network.\n\n"
               "Examples:\n\n  dtypelab compare minilm --to bf16,int8 --layers --json > layers.json\n\n"
               "  dtypelab report layers.json -o layers.html")
@click.argument("result", type=click.Path(dir_okay=False))
@click.option("-o", "--output", "output", required=True, type=click.Path(dir_okay=False),
              help="The .html file to write (whole or not at all).")
def report_cmd(result: str, output: str) -> None:
    check_html(output, sources=[result], option="-o")
    doc = read_result(Path(result))
    size = write_html(output, doc, run_facts(["dtypelab", "report", result], rendered_from=result))
    wrote(output)
    click.echo(f"wrote {output} ({size:,} bytes)")


def read_result(path: Path) -> dict:
    """A ``--json`` document of a kind and version this dtypelab renders.

    Raises:
        InputError: not readable, not JSON, no dtypelab schema, or one from a newer dtypelab.
    """
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise InputError(f"no such file: {path}") from exc
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise InputError(f"cannot read {path} as JSON ({type(exc).__name__}): give the output of a "
                         "dtypelab command run with --json") from exc
    schema = doc.get("schema") if isinstance(doc, dict) else None
    parts = schema.split("/") if isinstance(schema, str) else []
    if len(parts) != 3 or parts[0] != "dtypelab" or not parts[2].isdigit():
        raise InputError(f"{path} is not a dtypelab result (no \"schema\": \"dtypelab/<kind>/<version>\"): "
                         "give the output of a dtypelab command run with --json")
    known = {kind: version for kind, version in JSON_KINDS.values()}
    kind, version = parts[1], int(parts[2])
    if kind not in known:
        raise InputError(f"{path} holds a {kind!r} result, which this dtypelab does not know: render it with "
                         "the dtypelab that wrote it")
    if version > known[kind]:
        raise InputError(f"{path} is a {kind} result of version {version}, newer than this dtypelab reads "
                         f"({known[kind]}): upgrade dtypelab (pip install -U dtypelab)")
    return doc  # a kind without an entry in HTML_VIEWS is rendered by the generic view
