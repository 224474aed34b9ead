"""``dtypelab compare``: the model in float32 and in each ``--to`` format, measured side by side."""

from __future__ import annotations

import functools
import itertools
from collections.abc import Sequence
from pathlib import Path

import click

from .. import analysis, models, quant, variants
from ..errors import InputError
from ..executor import InProcess, executor_for
from ..formats import get_format
from ..lazy import lazy_module
from ..progress import ProgressCallback
from ..report import plot_layers
from .common import (
    MODEL_HELP,
    calibration_for,
    calibration_options,
    check_plot,
    check_result_options,
    device_option,
    emit,
    executor_options,
    html_side_output,
    input_options,
    keep_option,
    model_inputs_on,
    pickle_option,
    refuse_without,
    resolve_device,
    result_options,
    select_options,
)
from .progress import quiet_option, status_line

torch = lazy_module("torch")  # imported when a command runs, not for its --help


@click.command("compare", short_help="Measure each --to format against float32: error, size, speed.",
               help="Run MODEL in float32 and in each --to format on the same input and measure "
               "the difference (padding masked out), size, bits per element and (--time) latency. --to takes "
               "dtypes (fp16, bf16), quantized formats (int8, int4:g128:mse, mxfp4, nvfp4, int8:a8 ...; see "
               "`dtypelab formats`) and, when installed, peers (quanto:qint8, quanto:qint4, quanto:qfloat8, "
               "torchao:int8wo, torchao:int4wo, torchao:intx4, torchao:fp8wo). Without an input: the model's "
               "default ids or dtypelab's 64 bundled sentences. " + MODEL_HELP)
@click.argument("model")
@click.option("--to", "formats", default="fp16,bf16", show_default=True,
              help="Comma-separated formats (and peers) to compare against float32.")
@input_options
@calibration_options
@click.option("--output", "output_name",
              help="Output field to compare (logits, last_hidden_state, pooler_output …); "
                   "default: logits, else last_hidden_state.")
@keep_option
@pickle_option
@device_option
@click.option("--layers", "by_layer", is_flag=True, help="Compare every module's output, in execution order.")
@click.option("--mode", type=click.Choice(analysis.MODES), default="propagated", show_default=True,
              help="With --layers: each model on its own, or each variant layer fed the reference input.")
@select_options
@click.option("--threshold", "threshold_db", type=float, default=analysis.DEFAULT_THRESHOLD_DB,
              show_default=True, help="With --layers: name the first layer whose SQNR (dB) falls below this.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False),
              help="With --layers: write the SQNR-by-layer chart to this .png or .svg file.")
@click.option("--embeddings", is_flag=True,
              help="Quantized formats: quantize the embedding tables too (dense by default, as vLLM serves "
                   "them, and as convert writes them).")
@click.option("--head", is_flag=True,
              help="Quantized formats: quantize the output head too (dense by default, as vLLM serves it).")
@click.option("--plan", "plan_files", multiple=True, type=click.Path(dir_okay=False),
              help="Also compare the model quantized as a plan says (a file from `dtypelab plan -o`; "
                   "repeatable): the row `convert --plan` would write.")
@click.option("--time/--no-time", "timing", default=False, show_default=True,
              help="Also time forwards: each variant in turns with float32, its ratio to float32 timed "
                   "beside it and the ratio's per-round spread; 'slower' only beyond that noise. Off by "
                   "default (it about doubles the run time); --no-time is accepted and does nothing.")
@click.option("--compute", type=click.Choice(analysis.COMPUTES), default="reference", show_default=True,
              help="How the variants compute: reference (in float32, the format's error alone), bf16 "
                   "(activations and dense weights in bfloat16, as a bf16 deployment runs: its error "
                   "included, ~3x faster matmuls), int8 (W8A8 int8:a8 layers through torch._int_mm). "
                   "Each row says how it ran. Not with --layers.")
@executor_options("one task per --to format and --plan (each worker loads MODEL and runs float32 once; "
                  "the same numbers as in this process at 1 thread; not with --layers or --time)")
@result_options
@quiet_option
def compare_cmd(model: str, formats: str, texts: tuple[str, ...], text_file: str | None,
                input_ids: str | None, input_file: str | None,
                text_set: str | None, ctx: int | None, stride: int | None, windows: int | None,
                output_name: str | None,
                keep: tuple[str, ...], allow_pickle: bool, device: str, by_layer: bool, mode: str,
                depth: int | None, select: tuple[str, ...], threshold_db: float, plot_path: str | None,
                as_json: bool, embeddings: bool, head: bool, timing: bool, calib_file: str | None = None,
                calib_tokens: int | None = None, plan_files: tuple[str, ...] = (),
                quiet: bool = False, columns: tuple[str, ...] | None = None,
                html_path: str | None = None, workers: int | None = None,
                ray_address: str | None = None, compute: str = "reference",
                worker_threads: int = 1) -> None:
    specs, target = variants.parse_variant_specs(formats), resolve_device(device)
    check_result_options(as_json, columns, html_path, sources=[model])
    plans = [(Path(f).stem, quant.MixedPlan.load(f)) for f in plan_files]  # a bad plan file: before any load
    refuse_without(by_layer, "--layers", {"mode": "--mode", "depth": "--depth", "select": "--select",
                                          "threshold_db": "--threshold", "plot_path": "--plot"})
    if by_layer and compute != "reference":
        raise InputError(f"--compute {compute} measures the output comparison; --layers compares every "
                         "module in the reference's dtype: drop one of them")
    check_plot(plot_path, sources=[model])
    if (embeddings or head) and not any(s.format is not None and s.format.is_quantized for s in specs):
        raise InputError("--embeddings and --head choose what a quantized format stores; --to lists no "
                         "quantized format (casts convert every tensor): add one, e.g. int8, or drop them")
    executor = _executor(workers, ray_address, by_layer, timing, quiet, worker_threads)
    line = status_line(quiet)
    loaded = models.load(model, "fp32", allow_pickle=allow_pickle, progress=line)
    inputs = model_inputs_on(loaded, target, texts=texts, text_file=text_file, input_ids=input_ids,
                             input_file=input_file, text_set=text_set, ctx=ctx, stride=stride,
                             windows=windows)
    planned = [get_format(f) for _, plan in plans for f in set(plan.formats.values())]
    calibration = calibration_for(loaded, [s.format for s in specs] + planned, calib_file, calib_tokens)
    policy = quant.KeepPolicy.from_strings(keep)
    if not isinstance(executor, InProcess):
        state = functools.partial(compare_state, model, allow_pickle, device, formats, plan_files, calib_file,
                                  calib_tokens, dict(texts=texts, text_file=text_file, input_ids=input_ids,
                                                     input_file=input_file, text_set=text_set, ctx=ctx,
                                                     stride=stride, windows=windows))
        setup = analysis.CompareSetup(state, output_name, loaded.output_kind, model_kind=loaded.kind,
                                      keep=policy, embeddings=embeddings, head=head, device=str(target),
                                      compute=compute)
        tasks = [analysis.VariantTask(spec.spec) for spec in specs]
        tasks += [analysis.VariantTask(plan=plan, name=f"plan:{name}") for name, plan in plans]
        result = analysis.compare_on(executor, setup, tasks, progress=line)
        emit(result, as_json, html_side_output(result, html_path, model=model), columns=columns)
        return
    if not by_layer:
        result = compare_loaded(loaded, formats, inputs, target, output_name, policy, embeddings=embeddings,
                                head=head, timing=timing, calibration=calibration, plans=plans, progress=line,
                                compute=compute)
        emit(result, as_json, html_side_output(result, html_path, model=model), columns=columns)
        return
    reference = loaded.model.to(target)
    planned_variants = (variants.plan_variant(reference, plan, f"plan:{name}", target, calibration)
                        for name, plan in plans)
    built = variants.iter_variants(reference, specs, policy, embeddings, target, head=head,
                                   calibration=calibration, progress=line)
    candidates = itertools.chain(built, planned_variants)
    # a generator: each variant built, measured and dropped before the next (reference + one variant)
    result = analysis.compare_layers(reference, candidates, inputs, mode=mode, depth=depth, patterns=select,
                                     threshold_db=threshold_db, output_name=output_name,
                                     output_kind=loaded.output_kind, progress=line)
    plot = [("--plot", plot_path, lambda: plot_layers(result, plot_path))] if plot_path else []
    emit(result, as_json, plot + html_side_output(result, html_path, model=model), columns=columns)


def compare_loaded(loaded: models.LoadedModel, formats: str, inputs, target: torch.device,
                   output_name: str | None = None, policy: quant.KeepPolicy | None = None, *,
                   embeddings: bool = False, head: bool = False, timing: bool = False,
                   calibration: variants.CalibrationData | None = None,
                   plans: Sequence[tuple[str, quant.MixedPlan]] = (),
                   progress: ProgressCallback | None = None,
                   compute: str = "reference") -> analysis.ComparisonResult:
    """``compare`` without ``--layers``: variants built, measured and dropped one at a time; forwards are
    timed only when ``timing`` is True (``--time``); each (name, plan) of ``plans`` is one more row."""
    reference = loaded.model.to(target)
    planned = (variants.plan_variant(reference, plan, f"plan:{name}", target, calibration)
               for name, plan in plans)
    built = variants.iter_variants(reference, formats, policy, embeddings, target, head=head,
                                   calibration=calibration, progress=progress)
    candidates = itertools.chain(built, planned)
    return analysis.compare_models(reference, candidates, inputs, output_name=output_name,
                                   output_kind=loaded.output_kind, timing=timing, model_kind=loaded.kind,
                                   progress=progress, compute=compute)


def _executor(workers: int | None, ray_address: str | None, by_layer: bool, timing: bool, quiet: bool,
              threads: int = 1):
    """The executor ``--workers`` / ``--ray`` ask for; refused with ``--layers`` (one lockstep run over
    every module) and ``--time`` (latencies on cores the workers share would measure each other)."""
    if workers is not None or ray_address is not None:
        given = [o for o, on in (("--layers", by_layer), ("--time", timing)) if on]
        if given:
            raise InputError(f"--workers and --ray run compare's table one variant per task, not with "
                             f"{' and '.join(given)}: drop one or the other")
    return executor_for(workers, ray_address, quiet=quiet, threads=threads)


def compare_state(model: str, allow_pickle: bool, device: str, formats: str, plan_files: tuple[str, ...],
                  calib_file: str | None, calib_tokens: int | None, inputs: dict) -> tuple:
    """A worker's ``(reference, inputs, calibration)``, built as ``compare`` builds them in this process."""
    target = resolve_device(device)
    loaded = models.load(model, "fp32", allow_pickle=allow_pickle)
    batch = model_inputs_on(loaded, target, **inputs)
    planned = [get_format(f) for path in plan_files for f in set(quant.MixedPlan.load(path).formats.values())]
    fmts = [s.format for s in variants.parse_variant_specs(formats)] + planned
    return loaded.model.to(target), batch, calibration_for(loaded, fmts, calib_file, calib_tokens)
