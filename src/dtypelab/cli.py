"""The ``dtypelab`` command: parse, call the library, render. Nothing here computes.

Every :class:`~dtypelab.errors.DtypelabError` becomes one line on stderr and its exit code (2, or 3
for refused damage); ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import json
import logging
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import click
import torch

from . import layers, models
from .cast import KeepPolicy, cast_model
from .checkpoint import convert_checkpoint
from .compare import FailedVariant, compare_models, run_model, select_output
from .errors import DtypelabError, InputError
from .formats import format_table, parse_format_list, split_list
from .headroom import predict_headroom, weight_stats
from .inputs import model_inputs, to_device
from .inspection import inspect_model, param_dtype_lines
from .layers import compare_layers as layer_comparison
from .plot import plot_layers
from .quantize import apply_format, build_variants
from .report import TableMixin, to_jsonable

# One table: exception family -> how it is reported. Anything else is a bug and keeps its traceback.
ERROR_MESSAGES: dict[type[BaseException], Callable[[BaseException], tuple[str, int]]] = {
    DtypelabError: lambda e: (f"error: {e}", getattr(e, "exit_code", 2)),
    FileNotFoundError: lambda e: (f"error: no such file: {e.filename}", 2),
    PermissionError: lambda e: (f"error: permission denied: {e.filename}", 2),
    KeyboardInterrupt: lambda e: ("interrupted", 130),
}


# Optional peers print load noise when transformers imports them (missing CUDA kernels, pytree
# deprecations). It says nothing about the user's model, so the command line hides it.
NOISY_LOGGERS = ("torchao", "torch.utils._pytree")


def quiet_optional_imports() -> None:
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)


def main(argv: list[str] | None = None) -> None:
    """Console entry point."""
    argv = sys.argv[1:] if argv is None else argv
    quiet_optional_imports()
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
    """The ``--device`` asked for, once an empty tensor has been put there (no CUDA, no MPS in this
    build, ``cuda:99``: one line before any model loads)."""
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise InputError(f"unknown device {name!r}: use cpu, cuda or cuda:N") from exc
    with models.device_errors(device, "anything"):
        torch.empty(0, device=device)
    return device


def pickle_option(f: Callable) -> Callable:
    return click.option("--allow-pickle", is_flag=True,
                        help="Accept .bin/.pt pickle weights (read with torch.load(weights_only=True)).")(f)


def input_options(f: Callable) -> Callable:
    """--text / --text-file / --input / --input-file: one source; none = the model's default input."""
    for option in reversed([
        click.option("--text", "texts", multiple=True, help="A text to tokenise (repeatable: one batch)."),
        click.option("--text-file", type=click.Path(), help="Texts to tokenise, one per line."),
        click.option("--input", "input_ids", help="Token ids as JSON, e.g. '[[1, 0, 1]]'."),
        click.option("--input-file", type=click.Path(), help="Input tensors from .safetensors or .npy."),
    ]):
        f = option(f)
    return f


MODEL_HELP = ("MODEL: a built-in (" + ", ".join(models.builtin_names()) + "), a Hugging Face model folder, "
              "or package.module:factory.")


@cli.command("inspect", help="List every parameter and buffer of MODEL with dtype, shape and bytes; a bare "
             ".safetensors file or weights folder is read from its headers. " + MODEL_HELP)
@click.argument("model")
@click.option("--dtype", default="auto", show_default=True, help="Load in this dtype (auto: as stored).")
@pickle_option
@json_option
def inspect_cmd(model: str, dtype: str, allow_pickle: bool, as_json: bool) -> None:
    emit(models.inspect(model, dtype, allow_pickle=allow_pickle), as_json)


@cli.command("cast", help="Cast MODEL to another dtype and show what it then holds, dtype by dtype. "
             + MODEL_HELP)
@click.argument("model")
@click.option("--to", "fmt", required=True, help="Target dtype: fp32, fp16, bf16 (or aliases).")
@keep_option
@pickle_option
@json_option
def cast_cmd(model: str, fmt: str, keep: tuple[str, ...], allow_pickle: bool, as_json: bool) -> None:
    policy = KeepPolicy.from_strings(keep)
    if keep:
        cast = cast_model(models.load(model, allow_pickle=allow_pickle).model, fmt, policy)
    else:  # straight into the target dtype: no float32 copy of a checkpoint is made
        cast = models.load(model, fmt, allow_pickle=allow_pickle).model
    emit(inspect_model(cast), as_json)


@cli.command("compare", help="Run MODEL in float32 and in each --to format on the same input and measure the "
             "difference (padding masked out), size, bits per element and forward latency. --to takes dtypes "
             "(fp16, bf16), quantized formats (int8, int4:g128:mse, mxfp4, nvfp4, int8:a8 ...; see `dtypelab "
             "formats`) and, when installed, peers (quanto:qint8, quanto:qint4, quanto:qfloat8, "
             "torchao:int8wo, torchao:int4wo, torchao:intx4, torchao:fp8wo). Without an input: the model's "
             "default ids or dtypelab's 64 bundled sentences. " + MODEL_HELP)
@click.argument("model")
@click.option("--to", "formats", default="fp16,bf16", show_default=True,
              help="Comma-separated formats (and peers) to compare against float32.")
@input_options
@click.option("--output", "output_name",
              help="Output field to compare (logits, last_hidden_state, pooler_output …); "
                   "default: logits, else last_hidden_state.")
@keep_option
@pickle_option
@device_option
@click.option("--layers", "by_layer", is_flag=True, help="Compare every module's output, in execution order.")
@click.option("--mode", type=click.Choice(layers.MODES), default="propagated", show_default=True,
              help="With --layers: each model on its own, or each variant layer fed the reference input.")
@select_options
@click.option("--threshold", "threshold_db", type=float, default=layers.DEFAULT_THRESHOLD_DB,
              show_default=True, help="With --layers: name the first layer whose SQNR (dB) falls below this.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False),
              help="With --layers: write the SQNR-by-layer chart to this .png or .svg file.")
@json_option
@click.option("--embeddings/--no-embeddings", default=True, show_default=True,
              help="Quantize nn.Embedding tables too (quantized formats only).")
@click.option("--time/--no-time", "timing", default=True, show_default=True,
              help="Measure each variant's forward latency beside float32's (medians after warm-up).")
def compare_cmd(model: str, formats: str, texts: tuple[str, ...], text_file: str | None,
                input_ids: str | None, input_file: str | None, output_name: str | None,
                keep: tuple[str, ...], allow_pickle: bool, device: str, by_layer: bool, mode: str,
                depth: int | None, select: tuple[str, ...], threshold_db: float, plot_path: str | None,
                as_json: bool, embeddings: bool, timing: bool) -> None:
    target = resolve_device(device)
    loaded = models.load(model, "fp32", allow_pickle=allow_pickle)
    inputs = to_device(model_inputs(loaded, texts=texts, text_file=text_file, input_ids=input_ids,
                                    tensor_file=input_file), target)
    policy = KeepPolicy.from_strings(keep)
    if not by_layer:
        if plot_path or depth is not None or select or mode != "propagated":
            raise InputError("--mode, --depth, --select and --plot need --layers: add --layers")
        emit(compare_loaded(loaded, formats, inputs, target, output_name, policy, embeddings=embeddings,
                            timing=timing), as_json)
        return
    variants = {f.name: apply_format(loaded.model, f, policy, embeddings).to(target)
                for f in parse_format_list(formats)}
    result = layer_comparison(loaded.model.to(target), variants, inputs, mode=mode, depth=depth,
                              patterns=select, threshold_db=threshold_db, output_name=output_name,
                              output_kind=loaded.output_kind)
    if plot_path:
        plot_layers(result, plot_path)
    emit(result, as_json)


def compare_loaded(loaded: models.LoadedModel, formats: str, inputs, target: torch.device,
                   output_name: str | None = None, policy: KeepPolicy | None = None, *,
                   embeddings: bool = True, timing: bool = False) -> TableMixin:
    variants = build_variants(loaded.model, formats, policy, embeddings)
    variants = {name: v if isinstance(v, FailedVariant) else v.to(target) for name, v in variants.items()}
    return compare_models(loaded.model.to(target), variants, inputs, output_name=output_name,
                          output_kind=loaded.output_kind, timing=timing)


@cli.command("headroom", help="Predict from one float32 run which layers of MODEL overflow or underflow in "
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
@json_option
def headroom_cmd(model: str, formats: str, texts: tuple[str, ...], text_file: str | None,
                 input_ids: str | None, input_file: str | None, depth: int | None, select: tuple[str, ...],
                 weights: bool, allow_pickle: bool, device: str, as_json: bool) -> None:
    fmts, target = parse_format_list(formats), resolve_device(device)
    loaded = models.load(model, "fp32", allow_pickle=allow_pickle)
    inputs = to_device(model_inputs(loaded, texts=texts, text_file=text_file, input_ids=input_ids,
                                    tensor_file=input_file), target)
    reference = loaded.model.to(target)
    report = predict_headroom(reference, inputs, fmts, depth=depth, patterns=select)
    stats = weight_stats(reference, fmts) if weights else None
    if as_json and stats is not None:  # one JSON document holding both
        click.echo(json.dumps({"headroom": to_jsonable(report), "weights": to_jsonable(stats)}, indent=2))
        return
    for result in (report, stats):
        if result is not None:
            emit(result, as_json)


@cli.command("demo")
@click.option("--seed-only", is_flag=True, help="Only the seed notebook replay (skip minilm).")
def demo_cmd(seed_only: bool) -> None:
    """Replay the seed notebook with the library, then compare the built-in minilm in fp16, bf16, int8 and
    int4, and convert its checkpoint to int4 (compressed-tensors) in a temporary folder."""
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
    if not seed_only:
        loaded = models.load("minilm", "fp32")
        click.echo("\n== minilm (all-MiniLM-L6-v2) on dtypelab's 64 bundled sentences")
        click.echo(compare_loaded(loaded, "fp16,bf16,int8,int4:g128", model_inputs(loaded),
                                  torch.device("cpu")).to_text())
        with tempfile.TemporaryDirectory() as folder:
            click.echo("\n== minilm's checkpoint converted to int4:g128 (compressed-tensors, streamed)")
            click.echo(convert_checkpoint(models.minilm_path(), Path(folder) / "minilm-int4", "int4:g128",
                                          verify=True).to_text())


@cli.command("formats")
@click.argument("specs", required=False)
@json_option
def formats_cmd(specs: str | None, as_json: bool) -> None:
    """List number formats (or the comma-separated SPECS, e.g. int4:g64:asym,nvfp4) with their figures."""
    emit(format_table(split_list(specs) if specs else None), as_json)


# ------------------------------------------------------------------------------------------ convert

class ProgressLine:
    """Bytes done, rate and time left on one stderr line, redrawn at most 5 times a second."""

    def __init__(self) -> None:
        self.start = self.shown = time.monotonic()
        self.open_line = False

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        if now - self.shown < 0.2 and done < total:
            return
        self.shown, rate = now, done / max(now - self.start, 1e-9)
        left = (total - done) / rate if rate else 0.0
        self.open_line = done < total
        click.echo(f"\r{done / 1e9:.2f}/{total / 1e9:.2f} GB  {rate / 1e6:.0f} MB/s  {left:.0f} s left ",
                   err=True, nl=not self.open_line)

    def close(self) -> None:
        """End a line left open by a run that stopped early, so an error starts on its own line."""
        if self.open_line:
            click.echo("", err=True)


@cli.command("convert")
@click.argument("src")
@click.option("--to", "fmt", required=True,
              help="Target: bf16, fp16, fp32, fp8_e4m3:cast (plain casts), or int8, int4:g128, fp8_e4m3 "
                   "(Linear weights quantized, compressed-tensors layout, needs a model folder).")
@click.option("--dense", metavar="DTYPE",
              help="With a quantized --to: cast the tensors left dense (embeddings, norms) to bf16 / fp16.")
@click.option("-o", "--output", required=True,
              help="Destination folder (or a .safetensors file when SRC is one file).")
@click.option("--keep", multiple=True, metavar="NAME|GLOB",
              help="Tensors left exactly as they are: a name or a glob (*norm*). Repeatable.")
@click.option("--max-shard-size", help="Reshard into files of at most this size (5GB, 500MiB); "
                                       "default keeps the source's files.")
@click.option("--force", is_flag=True, help="Replace an existing destination (a checkpoint file or model "
                                            "folder only).")
@click.option("--verify", is_flag=True, help="Re-read the output and check it bit for bit.")
@click.option("--fsync", is_flag=True, help="Flush the output to disk before renaming it into place "
                                            "(complete or absent after a power loss too).")
@click.option("--strict", is_flag=True, help="Refuse (exit 3, nothing written) if any value overflows "
                                             "or flushes to zero (quantized: is clipped).")
@click.option("--report", "report_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Write every tensor's damage counts to this JSON file.")
@click.option("--quiet", is_flag=True, help="Print nothing but errors.")
@json_option
def convert_cmd(src: str, fmt: str, dense: str | None, output: str, keep: tuple[str, ...],
                max_shard_size: str | None, force: bool, verify: bool, fsync: bool, strict: bool,
                report_path: Path | None, quiet: bool, as_json: bool) -> None:
    """Convert a safetensors file or model folder SRC to another format, tensor by tensor."""
    if report_path is not None and not report_path.parent.is_dir():
        raise InputError(f"--report {report_path}: no folder {report_path.parent} to write it in: create it "
                         "or choose another path")
    progress = ProgressLine() if not quiet and not as_json and sys.stderr.isatty() else None
    try:
        result = convert_checkpoint(src, output, fmt, keep=keep, max_shard_size=max_shard_size,
                                    force=force, verify=verify, strict=strict, progress=progress,
                                    dense=dense, fsync=fsync)
    finally:
        if progress is not None:
            progress.close()
    if report_path is not None:
        report_path.write_text(result.to_json() + "\n", encoding="utf-8")
    if not quiet:
        emit(result, as_json)
