"""The ``dtypelab`` command: parse, call the library, render. Nothing here computes.

Every :class:`~dtypelab.errors.DtypelabError` becomes one line on stderr and its exit code (2, or 3
for refused damage); ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path

import click
import torch

from . import models
from .cast import KeepPolicy, cast_model
from .checkpoint import convert_checkpoint
from .compare import compare_models, run_model, select_output
from .errors import DtypelabError, InputError
from .formats import parse_format_list
from .inputs import parse_token_ids
from .inspection import inspect_model, param_dtype_lines
from .report import TableMixin

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
@json_option
def compare_cmd(model: str, formats: str, input_text: str | None, output_name: str | None,
                keep: tuple[str, ...], device: str, as_json: bool) -> None:
    """Run MODEL in float32 and in each --to dtype on the same input and measure the difference."""
    fmts, target = parse_format_list(formats), resolve_device(device)
    reference = models.build_model(model)
    inputs = load_inputs(model, input_text, reference).to(target)
    policy = KeepPolicy.from_strings(keep)
    variants = {f.name: cast_model(reference, f, policy).to(target) for f in fmts}
    result = compare_models(reference.to(target), variants, inputs, output_name=output_name,
                            output_kind=models.output_kind(model))
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
@click.option("--to", "fmt", required=True, help="Target dtype: bf16, fp16, fp32 (or aliases).")
@click.option("-o", "--output", required=True,
              help="Destination folder (or a .safetensors file when SRC is one file).")
@click.option("--keep", multiple=True, metavar="NAME|GLOB",
              help="Tensors left exactly as they are: a name or a glob (*norm*). Repeatable.")
@click.option("--max-shard-size", help="Reshard into files of at most this size (5GB, 500MiB); "
                                       "default keeps the source's files.")
@click.option("--force", is_flag=True, help="Replace an existing destination.")
@click.option("--verify", is_flag=True, help="Re-read the output and check it bit for bit.")
@click.option("--strict", is_flag=True, help="Refuse (exit 3, nothing written) if any value overflows "
                                             "or flushes to zero.")
@click.option("--report", "report_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Write every tensor's damage counts to this JSON file.")
@click.option("--quiet", is_flag=True, help="Print nothing but errors.")
@json_option
def convert_cmd(src: str, fmt: str, output: str, keep: tuple[str, ...], max_shard_size: str | None,
                force: bool, verify: bool, strict: bool, report_path: Path | None, quiet: bool,
                as_json: bool) -> None:
    """Convert a safetensors file or model folder SRC to another dtype, tensor by tensor."""
    progress = ProgressLine() if not quiet and not as_json and sys.stderr.isatty() else None
    try:
        result = convert_checkpoint(src, output, fmt, keep=keep, max_shard_size=max_shard_size,
                                    force=force, verify=verify, strict=strict, progress=progress)
    finally:
        if progress is not None:
            progress.close()
    if report_path is not None:
        report_path.write_text(result.to_json() + "\n", encoding="utf-8")
    if not quiet:
        emit(result, as_json)
