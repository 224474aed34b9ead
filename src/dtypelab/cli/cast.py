"""``dtypelab cast``: a model in another dtype, and what it then holds."""

from __future__ import annotations

import click

from .. import models, quant
from .common import (
    MODEL_HELP,
    columns_option,
    emit,
    json_option,
    keep_option,
    pickle_option,
    refuse_columns_with_json,
)


@click.command("cast", short_help="A model cast to another dtype, and what it then holds.",
               help="Cast MODEL to another dtype and show what it then holds, dtype by dtype. "
               + MODEL_HELP)
@click.argument("model")
@click.option("--to", "fmt", required=True, help="Target dtype: fp32, fp16, bf16 (or aliases).")
@keep_option
@pickle_option
@json_option
@columns_option
def cast_cmd(model: str, fmt: str, keep: tuple[str, ...], allow_pickle: bool, as_json: bool,
             columns: tuple[str, ...] | None = None) -> None:
    refuse_columns_with_json(columns, as_json)
    policy = quant.KeepPolicy.from_strings(keep)
    if keep:
        cast = quant.cast_model(models.load(model, allow_pickle=allow_pickle).model, fmt, policy)
    else:  # straight into the target dtype: no float32 copy of a checkpoint is made
        cast = models.load(model, fmt, allow_pickle=allow_pickle).model
    emit(quant.inspect_model(cast), as_json, columns=columns)
