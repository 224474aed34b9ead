"""``dtypelab inspect``: what a model or checkpoint holds."""

from __future__ import annotations

import click

from .. import models
from .common import MODEL_HELP, columns_option, emit, json_option, pickle_option, refuse_columns_with_json


@click.command("inspect", short_help="What a model or checkpoint holds: dtypes, shapes, bytes.",
               help="List every parameter and buffer of MODEL with dtype, shape and bytes; a bare "
               ".safetensors file or weights folder is read from its headers. " + MODEL_HELP)
@click.argument("model")
@click.option("--dtype", default="auto", show_default=True, help="Load in this dtype (auto: as stored).")
@pickle_option
@json_option
@columns_option
def inspect_cmd(model: str, dtype: str, allow_pickle: bool, as_json: bool,
                columns: tuple[str, ...] | None = None) -> None:
    refuse_columns_with_json(columns, as_json)
    emit(models.inspect(model, dtype, allow_pickle=allow_pickle), as_json, columns=columns)
