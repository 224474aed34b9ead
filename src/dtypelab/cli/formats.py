"""``dtypelab formats``: the number formats and their figures."""

from __future__ import annotations

import click

from ..formats import format_table, split_list
from .common import emit, json_option


@click.command("formats", short_help="The number formats and their figures (bits, range, precision).")
@click.argument("specs", required=False)
@json_option
def formats_cmd(specs: str | None, as_json: bool) -> None:
    """List number formats (or the comma-separated SPECS, e.g. int4:g64:asym,nvfp4) with their figures."""
    emit(format_table(split_list(specs) if specs else None), as_json)
