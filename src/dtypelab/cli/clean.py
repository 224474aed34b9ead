"""``dtypelab clean``: list the staging folders killed conversions left, and remove the stale ones."""

from __future__ import annotations

import click

from .. import checkpoint
from .common import emit, json_option


@click.command("clean", short_help="Remove staging folders killed conversions left (never a live one's).")
@click.argument("folder", default=".", type=click.Path(exists=True, file_okay=False))
@click.option("--dry-run", is_flag=True, help="Only list them.")
@json_option
def clean_cmd(folder: str, dry_run: bool, as_json: bool) -> None:
    """List the staging folders that conversions into FOLDER (default: the current one) left behind, and
    remove the stale ones: those whose run is gone (nobody holds their lock). A running conversion's
    folder is listed as live and never touched; any convert into FOLDER removes stale ones too."""
    emit(checkpoint.clean_leftovers(folder, dry_run=dry_run), as_json)
