"""The ``dtypelab`` command: parse, call the library, render. Nothing here computes.

Every :class:`~dtypelab.errors.DtypelabError` becomes one line on stderr and its exit code (2, or 3
for refused damage); ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable

import click
import torch

from . import layers, models
from .cast import KeepPolicy, cast_model
from .compare import compare_models, run_model, select_output
from .errors import DtypelabError, InputError
from .formats import parse_format_list
from .headroom import predict_headroom, weight_stats
from .inputs import parse_token_ids
from .inspection import inspect_model, param_dtype_lines
from .layers import compare_layers as layer_comparison
from .plot import plot_layers
from .report import TableMixin, to_jsonable

# One table: exception family -> how it is reported. Anything else is a bug and keeps its traceback.
ERROR_MESSAGES: dict[type[BaseException], Callable[[BaseException], tuple[str, int]]] = {
    DtypelabError: lambda e: (f"error: {e}", getattr(e, "exit_code", 2)),
    FileNotFoundError: lambda e: (f"error: no such file: {e.filename}", 2),
    PermissionError: lambda e: (f"error: permission denied: {e.filename}", 2),
    KeyboardInterrupt: lambda e: ("interrupted", 130),
}


def main(argv: list[str] | None = None) -> None:
    """Console entry point."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        cli.main(args=argv, prog_name="dtypelab", standalone_mode=False)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except tuple(ERROR_MESSAGES) as exc:
        if "--debug" in argv:
            raise
        message, code = next(fmt(exc) for kind, fmt in ERROR_MESSAGES.items() if isinstance(exc, kind))
        click.echo(message, err=True)
        sys.exit(code)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show tracebacks instead of one-line errors.")
def cli(debug: bool) -> None:
    """What happens to my model in precision X? Inspect, cast and compare."""


def emit(result: TableMixin, as_json: bool) -> None:
    click.echo(result.to_json() if as_json else result.to_text())


def json_option(f: Callable) -> Callable:
    return click.option("--json", "as_json", is_flag=True, help="Machine-readable JSON output.")(f)


def device_option(f: Callable) -> Callable:
    return click.option("--device", default="cpu", show_default=True,
                        help="Where to run: cpu, cuda, cuda:1, mps …")(f)


def keep_option(f: Callable) -> Callable:
    return click.option("--keep", multiple=True, metavar="TYPE|GLOB",
                        help="Keep matching modules in float32: a class name (LayerNorm) or a name glob "
                             "(head, *.norm). Repeatable.")(f)


def select_options(f: Callable) -> Callable:
    f = click.option("--select", multiple=True, metavar="GLOB",
                     help="Only modules whose qualified name matches (layers.*.mlp). Repeatable.")(f)
    return click.option("--depth", type=int, help="Only modules at most N name components deep.")(f)


def resolve_device(name: str) -> torch.device:
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise InputError(f"unknown device {name!r}: use cpu, cuda or cuda:N") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device {name!r} requested but torch sees no CUDA GPU: use --device cpu")
    return device


def load_inputs(spec: str, text: str | None, model: torch.nn.Module) -> torch.Tensor:
    ids = parse_token_ids(text) if text is not None else models.default_input(spec)
    if ids is None:
        raise InputError(f"model {spec!r} has no default input: give token ids with --input '[[1, 2, 3]]'")
    models.validate_token_ids(model, ids)
    return ids


@cli.command("inspect")
@click.argument("model")
@json_option
def inspect_cmd(model: str, as_json: bool) -> None:
    """List every parameter and buffer of MODEL with dtype, shape and bytes."""
    emit(inspect_model(models.build_model(model)), as_json)


@cli.command("cast")
@click.argument("model")
@click.option("--to", "fmt", required=True, help="Target dtype: fp32, fp16, bf16 (or aliases).")
@keep_option
@json_option
def cast_cmd(model: str, fmt: str, keep: tuple[str, ...], as_json: bool) -> None:
    """Cast MODEL to another dtype and show what it then holds, dtype by dtype."""
    emit(inspect_model(cast_model(models.build_model(model), fmt, KeepPolicy.from_strings(keep))), as_json)


@cli.command("compare")
@click.argument("model")
@click.option("--to", "formats", default="fp16,bf16", show_default=True,
              help="Comma-separated dtypes to compare against float32.")
@click.option("--input", "input_text", help="Token ids as JSON, e.g. '[[1, 0, 1]]'.")
@click.option("--output", "output_name", help="Output field to compare (logits, last_hidden_state, …).")
@keep_option
@device_option
@click.option("--layers", is_flag=True, help="Compare every module's output, in execution order.")
@click.option("--mode", type=click.Choice(layers.MODES), default="propagated", show_default=True,
              help="With --layers: each model on its own, or each variant layer fed the reference input.")
@select_options
@click.option("--threshold", "threshold_db", type=float, default=layers.DEFAULT_THRESHOLD_DB,
              show_default=True, help="With --layers: name the first layer whose SQNR (dB) falls below this.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False),
              help="With --layers: write the SQNR-by-layer chart to this .png or .svg file.")
@json_option
def compare_cmd(model: str, formats: str, input_text: str | None, output_name: str | None,
                keep: tuple[str, ...], device: str, layers: bool, mode: str, depth: int | None,
                select: tuple[str, ...], threshold_db: float, plot_path: str | None, as_json: bool) -> None:
    """Run MODEL in float32 and in each --to dtype on the same input and measure the difference."""
    fmts, target = parse_format_list(formats), resolve_device(device)
    reference = models.build_model(model)
    inputs = load_inputs(model, input_text, reference).to(target)
    policy = KeepPolicy.from_strings(keep)
    variants = {f.name: cast_model(reference, f, policy).to(target) for f in fmts}
    if not layers:
        if plot_path or depth is not None or select or mode != "propagated":
            raise InputError("--mode, --depth, --select and --plot need --layers: add --layers")
        emit(compare_models(reference.to(target), variants, inputs, output_name=output_name,
                            output_kind=models.output_kind(model)), as_json)
        return
    result = layer_comparison(reference.to(target), variants, inputs, mode=mode, depth=depth,
                              patterns=select, threshold_db=threshold_db, output_name=output_name,
                              output_kind=models.output_kind(model))
    if plot_path:
        plot_layers(result, plot_path)
    emit(result, as_json)


@cli.command("headroom")
@click.argument("model")
@click.option("--to", "formats", default="fp16,bf16", show_default=True,
              help="Comma-separated formats to predict overflow and underflow for.")
@click.option("--input", "input_text", help="Token ids as JSON, e.g. '[[1, 0, 1]]'.")
@select_options
@click.option("--weights", is_flag=True,
              help="Also show weight statistics and each format's weight-only error.")
@device_option
@json_option
def headroom_cmd(model: str, formats: str, input_text: str | None, depth: int | None, select: tuple[str, ...],
                 weights: bool, device: str, as_json: bool) -> None:
    """Predict from one float32 run which layers overflow or underflow in each format, and what to keep
    in float32 (pass the list to --keep)."""
    fmts, target = parse_format_list(formats), resolve_device(device)
    reference = models.build_model(model).to(target)
    inputs = load_inputs(model, input_text, reference).to(target)
    report = predict_headroom(reference, inputs, fmts, depth=depth, patterns=select)
    stats = weight_stats(reference, fmts) if weights else None
    if as_json and stats is not None:  # one JSON document holding both
        click.echo(json.dumps({"headroom": to_jsonable(report), "weights": to_jsonable(stats)}, indent=2))
        return
    for result in (report, stats):
        if result is not None:
            emit(result, as_json)


@cli.command("demo")
def demo_cmd() -> None:
    """Replay the seed notebook with the library: dtypes, logits, the diff line, the full table."""
    model, inputs = models.build_model("dummy"), models.default_input("dummy")
    variants = {"fp16": cast_model(model, "fp16"), "bf16": cast_model(model, "bf16")}
    for name, m in [("fp32", model), *variants.items()]:
        click.echo(f"== {name}: parameter dtypes")
        click.echo("\n".join(param_dtype_lines(m)))
        click.echo(f"logits ({name}):\n{select_output(run_model(m, inputs))}\n")
    result = compare_models(model, variants, inputs, output_kind="logits")
    bf16 = result.variants[1].metrics
    click.echo(f"Mean diff: {bf16.mean_abs_diff} | Max diff: {bf16.max_abs_diff}\n")
    click.echo(result.to_text())

