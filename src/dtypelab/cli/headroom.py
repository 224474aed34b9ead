"""``dtypelab headroom``: which layers overflow or underflow in each format, predicted from float32."""

from __future__ import annotations

import click

from .. import analysis, models, variants
from ..report import composite_document
from .common import (
    MODEL_HELP,
    TableGroup,
    check_result_options,
    device_option,
    emit,
    html_side_output,
    input_options,
    model_inputs_on,
    pickle_option,
    resolve_device,
    result_options,
    select_options,
)
from .progress import clear_status_line, quiet_option, status_line


@click.command("headroom", short_help="Which layers overflow or underflow per format; what to keep.",
               help="Predict from one float32 run which layers of MODEL overflow or underflow in "
               "each format, and which modules to keep in float32 (pass them to --keep). " + MODEL_HELP)
@click.argument("model")
@click.option("--to", "formats", default="fp16,bf16", show_default=True,
              help="Comma-separated formats to predict overflow and underflow for.")
@input_options
@select_options
@click.option("--weights", is_flag=True,
              help="Also show weight statistics and each format's weight-only error.")
@pickle_option
@device_option
@result_options
@quiet_option
def headroom_cmd(model: str, formats: str, texts: tuple[str, ...], text_file: str | None,
                 input_ids: str | None, input_file: str | None, text_set: str | None, ctx: int | None,
                 stride: int | None, windows: int | None, depth: int | None, select: tuple[str, ...],
                 weights: bool, allow_pickle: bool, device: str, as_json: bool, quiet: bool = False,
                 columns: tuple[str, ...] | None = None, html_path: str | None = None) -> None:
    specs, target = variants.parse_variant_specs(formats), resolve_device(device)
    check_result_options(as_json, columns, html_path, sources=[model])
    line = status_line(quiet)
    loaded = models.load(model, "fp32", allow_pickle=allow_pickle, progress=line)
    inputs = model_inputs_on(loaded, target, texts=texts, text_file=text_file, input_ids=input_ids,
                             input_file=input_file, text_set=text_set, ctx=ctx, stride=stride,
                             windows=windows)
    reference = loaded.model.to(target)
    report = analysis.predict_headroom(reference, inputs, [s.format or s.spec for s in specs], depth=depth,
                                       patterns=select, progress=line)
    stats = analysis.weight_stats(reference, [s.format for s in specs if s.format]) if weights else None
    html = html_side_output(report, html_path, model=model)
    if as_json and stats is not None:  # one JSON document holding both
        clear_status_line()
        click.echo(composite_document("headroom-weights", {"headroom": report, "weights": stats}))
        emit(report, as_json, html, show=False)
        return
    emit(report if stats is None else TableGroup([report, stats]), as_json, html, columns=columns)
