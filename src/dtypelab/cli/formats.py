"""``dtypelab formats``: the number formats and their figures."""

from __future__ import annotations

import click

from ..formats import format_table, split_list
from .common import columns_option, emit, json_option, refuse_columns_with_json


@click.command("formats", short_help="The number formats and their figures (bits, range, precision).")
@click.argument("specs", required=False)
@json_option
@columns_option
def formats_cmd(specs: str | None, as_json: bool, columns: tuple[str, ...] | None = None) -> None:
    """List number formats (or the comma-separated SPECS, e.g. int4:g64:asym,nvfp4) with their figures."""
    refuse_columns_with_json(columns, as_json)
    emit(format_table(split_list(specs) if specs else None), as_json, columns=columns)
