"""``dtypelab convert``: a checkpoint in another format, streamed tensor by tensor."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import click

from .. import checkpoint, quant, variants
from ..errors import DamageError, InputError
from ..executor import executor_for
from ..formats import get_format
from ..progress import ProgressEvent
from .common import (
    calibration_options,
    check_html,
    check_output,
    emit,
    executor_options,
    html_side_output,
    pickle_option,
    refuse_columns_with_json,
    result_options,
    wrote,
)
from .progress import status_line


class ProgressLine:
    """Bytes done, rate and time left on one stderr line, redrawn at most 5 times a second."""

    def __init__(self) -> None:
        self.start = self.shown = time.monotonic()
        self.open_line = False

    def __call__(self, event: ProgressEvent) -> None:
        done, total = event.done, event.total or 0
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


@click.command("convert", short_help="A checkpoint in another format, streamed; complete or absent.")
@click.argument("src")
@click.option("--to", "fmt",
              help="Target: bf16, fp16, fp32, fp8_e4m3:cast (plain casts), or int8, int4:g128, fp8_e4m3 "
                   "(Linear and GPT-2 Conv1D weights quantized, compressed-tensors layout, needs a model "
                   "folder). Required unless --plan is given.")
@click.option("--plan", "plan_file", type=click.Path(dir_okay=False),
              help="A mixed-precision plan (`dtypelab plan -o`): each layer in its planned format, one "
                   "compressed-tensors config group per scheme, instead of --to.")
@click.option("--dense", metavar="DTYPE",
              help="With a quantized --to: cast the tensors left dense (embeddings, norms) to bf16 / fp16.")
@click.option("--head", is_flag=True,
              help="With a quantized --to: quantize the output head too (dense by default, as vLLM "
                   "serves it).")
@click.option("--embeddings", is_flag=True,
              help="Refused with the reason: embeddings stay dense in the compressed-tensors output "
                   "(compare's option, here one clear line).")
@click.option("-o", "--output", required=True,
              help="Destination folder (or a .safetensors file when SRC is one file).")
@click.option("--keep", multiple=True, metavar="NAME|GLOB",
              help="Tensors left exactly as they are: a name or a glob (*norm*). Repeatable.")
@click.option("--max-shard-size", help="Reshard into files of at most this size (5GB, 500MiB); "
                                       "default keeps the source's files.")
@click.option("--force", count=True,
              help="Replace an existing destination that holds only a checkpoint (a .safetensors file, or a "
                   "folder of a checkpoint's files); any other file in it is named and refused. Twice "
                   "(--force --force): replace it whatever it holds.")
@click.option("--verify", is_flag=True, help="Re-read the output and check it bit for bit.")
@click.option("--fsync", is_flag=True, help="Flush the output to disk before renaming it into place "
                                            "(complete or absent after a power loss too).")
@click.option("--strict", is_flag=True,
              help="Refuse (exit 3, nothing written) an output where a tensor loses values: any overflow "
                   "(quantized: clipping), or a flush to zero that is not negligible (a tensor's flushes "
                   "are negligible when even the largest is below 2^-10 of its RMS).")
@click.option("--max-flushed", metavar="N|FRACTION",
              help="With --strict: let each tensor flush up to N (3) or this fraction of its values (1e-6) "
                   "to zero beyond the negligible ones. Default 0.")
@click.option("--max-overflowed", metavar="N",
              help="With --strict: let each tensor overflow (quantized: clip) up to N values. Default 0.")
@click.option("--report", "report_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Write every tensor's damage counts to this JSON file (also when --strict refuses: "
                   "then with \"refused\": true).")
@click.option("--quiet", is_flag=True, help="Print nothing but errors.")
@executor_options("each output shard as a task (the same bytes as in this process; across nodes, the source "
                  "and -o's folder on a filesystem every worker shares)")
@calibration_options
@pickle_option
@result_options
def convert_cmd(src: str, fmt: str, dense: str | None, output: str, keep: tuple[str, ...],
                max_shard_size: str | None, force: int, verify: bool, fsync: bool, strict: bool,
                max_flushed: str | None, max_overflowed: str | None, report_path: Path | None, quiet: bool,
                as_json: bool, head: bool, embeddings: bool, plan_file: str | None = None,
                calib_file: str | None = None, calib_tokens: int | None = None,
                columns: tuple[str, ...] | None = None, html_path: str | None = None,
                allow_pickle: bool = False, workers: int | None = None,
                ray_address: str | None = None, worker_threads: int = 1) -> None:
    """Convert a safetensors file or model folder SRC to another format, tensor by tensor (.bin / .pt
    pickle weights with --allow-pickle: written as safetensors)."""
    refuse_columns_with_json(columns, as_json)
    if (fmt is None) == (plan_file is None):
        raise InputError("give the format with --to (e.g. --to int4:g128) or a plan with --plan plan.json, "
                         "one of them")
    plan = quant.MixedPlan.load(plan_file) if plan_file else None
    check_output(output, "-o", make_parents=True, sources=[src])
    if report_path is not None:
        check_output(report_path, "--report", suffixes=(".json",), sources=[src, output])
    check_html(html_path, sources=[src, output])
    for leftover in checkpoint.remove_leftovers(output):  # never silently: the user may wonder where it went
        if not quiet:
            click.echo(f"removed {leftover}: the staging folder of a conversion that was killed", err=True)
    calibrated = _calibrated(fmt, plan, calib_file, calib_tokens, {
        "--dense": dense, "--max-shard-size": max_shard_size, "--verify": verify,
        "--strict": strict, "--embeddings": embeddings, "--fsync": fsync, "--report": report_path,
        "--workers": workers, "--ray": ray_address})
    executor = executor_for(workers, ray_address, quiet=quiet, threads=worker_threads)
    progress = ProgressLine() if not quiet and not as_json and sys.stderr.isatty() else None
    if calibrated and progress is not None:  # minutes of calibration blocks, not bytes: the stage line
        progress = status_line(quiet)
    try:
        if calibrated:
            result = variants.convert_calibrated(src, output, fmt, plan=plan, calib_file=calib_file,
                                                 keep=keep, head=head, force=force, progress=progress,
                                                 calib_tokens=calib_tokens or variants.DEFAULT_CALIB_TOKENS)
        else:
            result = checkpoint.convert_checkpoint(src, output, fmt, keep=keep, max_shard_size=max_shard_size,
                                                   force=force, verify=verify, strict=strict,
                                                   progress=progress, dense=dense, fsync=fsync,
                                                   max_flushed=max_flushed, max_overflowed=max_overflowed,
                                                   head=head, embeddings=embeddings, plan=plan,
                                                   allow_pickle=allow_pickle, executor=executor)
    except DamageError as exc:  # refused by --strict: the report of what it would have done still asked for
        refused = getattr(exc, "result", None)
        if report_path is not None and refused is not None:
            try:
                report_path.write_text(refused.to_json() + "\n", encoding="utf-8")
            except OSError as err:  # the refusal is still the run's answer (exit 3); this is said too
                click.echo(f"error: --report {report_path} could not be written: {err.strerror}", err=True)
        raise
    finally:
        if progress is not None:
            progress.close()
    wrote(output)
    report = [("--report", report_path, lambda: report_path.write_text(result.to_json() + "\n",
                                                                       encoding="utf-8"))]
    side = (report if report_path is not None else []) + html_side_output(result, html_path, source=src)
    emit(result, as_json, side, show=not quiet, columns=columns)


def _calibrated(fmt: str | None, plan: quant.MixedPlan | None, calib_file: str | None,
                calib_tokens: int | None, refused: dict) -> bool:
    """Whether ``--to`` is a ``:gptq`` / ``:awq`` format or ``--plan`` names one (written by
    ``convert_calibrated``); the options that path does not take, and the calibration options without
    it, are refused in one line."""
    named = [fmt] if fmt is not None else sorted(set(plan.formats.values())) if plan is not None else []
    calibrated = any(get_format(f).calibration is not None for f in named)
    what = f"--to {fmt}" if fmt is not None else "--plan with calibrated formats"
    if not calibrated and (calib_file is not None or calib_tokens is not None):
        raise InputError("--calib-file and --calib-tokens calibrate :gptq / :awq formats: give one with --to "
                         "(e.g. int4:g64:gptq) or a plan naming one, or drop them")
    given = [option for option, value in refused.items() if value]
    if calibrated and given:
        raise InputError(f"{', '.join(given)}: not with a calibrated {what} (the model is loaded and "
                         "written whole, codes as calibration chose them): drop them")
    return calibrated
