"""``dtypelab sensitivity``: which layer groups a format hurts most, each quantized alone, ranked."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import click

from .. import analysis, models, variants
from ..errors import InputError
from ..executor import executor_for
from ..formats import get_format, split_list
from ..lazy import lazy_module
from .common import (
    MODEL_HELP,
    calibration_for,
    calibration_options,
    check_result_options,
    device_option,
    emit,
    executor_options,
    html_side_output,
    input_options,
    model_inputs_on,
    pickle_option,
    resolve_device,
    result_options,
)

torch = lazy_module("torch")  # imported when a command runs, not for its --help

CALIBRATION_WINDOWS = 8
"""Windows of the calibration text the ranking reads by default (8 × 512 tokens): enough positions
for a stable ranking at a few forwards' cost; ``--windows`` changes it."""


def ranking_options(f: Callable) -> Callable:
    """What sensitivity and plan share: the input (the calibration text by default), the method, scope."""
    for option in reversed([
        click.option("--exact", is_flag=True,
                     help="Also measure the truth: one forward per layer group and format with only that "
                          "group quantized (slow), and the prediction's Spearman rank correlation with it."),
        click.option("--method", type=click.Choice(analysis.SENSITIVITY_METHODS), default="fisher",
                     show_default=True,
                     help="fisher: predicted from one forward + one backward pass; exact: only the truth."),
        click.option("--exclude", multiple=True,
                     help="Layers (globs) left out of the ranking, dense (repeatable)."),
        click.option("--head", is_flag=True, help="Rank the output head too (dense by default)."),
        click.option("--seed", type=int, default=0, show_default=True,
                     help="Seed of the sampled labels / random probes of the fisher prediction."),
    ]):
        f = option(f)
    f = executor_options("the exact sweep's (group, format) forwards (with --exact; plan: also --verify's "
                         "measurements)")(f)
    return calibration_options(input_options(pickle_option(device_option(f))))


def ranking_inputs(loaded: models.LoadedModel, target: torch.device, texts: tuple[str, ...],
                   text_file: str | None, input_ids: str | None, input_file: str | None, text_set: str | None,
                   ctx: int | None,
                   stride: int | None, windows: int | None):
    """The inputs a ranking is computed on: what the user gave, else (a model with a tokenizer) the
    first :data:`CALIBRATION_WINDOWS` windows of the calibration text — never the held-out evaluation
    text a plan is verified on."""
    given = texts or text_file or input_ids or input_file or text_set
    if not given and loaded.tokenizer is not None:
        text_set, windows = "calibration", CALIBRATION_WINDOWS if windows is None else windows
    return model_inputs_on(loaded, target, texts=texts, text_file=text_file, input_ids=input_ids,
                           input_file=input_file, text_set=text_set, ctx=ctx, stride=stride, windows=windows)


def rank(model: str, formats: str, allow_pickle: bool, device: str, method: str, exact: bool,
         exclude: tuple[str, ...], head: bool, seed: int, calib_file: str | None = None,
         calib_tokens: int | None = None, workers: int | None = None, ray_address: str | None = None,
         worker_threads: int = 1,
         **inputs) -> tuple[models.LoadedModel, analysis.SensitivityResult, variants.CalibrationData | None]:
    """Load ``model`` in float32 and rank its layer groups in ``formats`` (shared by plan); also the
    calibration its ``:gptq`` / ``:awq`` formats were scored with (what a plan's model calibrates on).
    ``workers`` / ``ray_address``: the exact sweep's executor (:mod:`dtypelab.executor`)."""
    if (workers is not None or ray_address is not None) and not (exact or method == "exact"):
        raise InputError("--workers and --ray run the exact sweep: add --exact (or --method exact), or "
                         "drop them")
    executor = executor_for(workers, ray_address, threads=worker_threads)
    fmts = [get_format(f) for f in split_list(formats)]  # a typo is refused before the model loads
    setup = functools.partial(ranking_state, model, allow_pickle, device, fmts, calib_file, calib_tokens,
                              inputs)
    loaded, reference, batch, calibration = load_ranking(model, allow_pickle, device, fmts, calib_file,
                                                         calib_tokens, inputs)
    return loaded, analysis.sensitivity(reference, formats, batch, method=method, exact=exact,
                               output_kind=loaded.output_kind, exclude=exclude, head=head, seed=seed,
                               calibration=calibration.batches if calibration else None,
                               executor=executor, worker_setup=setup), calibration


def load_ranking(model: str, allow_pickle: bool, device: str, fmts: list, calib_file: str | None,
                 calib_tokens: int | None, inputs: dict):
    """(loaded, reference on the device, the ranking's inputs, the calibration): what ``rank`` measures
    on, and what each worker of a parallel sweep rebuilds the same way."""
    target = resolve_device(device)
    loaded = models.load(model, "fp32", allow_pickle=allow_pickle)
    calibration = calibration_for(loaded, fmts, calib_file, calib_tokens)
    batch = ranking_inputs(loaded, target, **inputs)
    reference = loaded.model.to(target)
    if calibration is not None:
        calibration = dataclasses.replace(calibration, batches=[models.to_device(b, target) for b in
                                                                calibration.batches])
    return loaded, reference, batch, calibration


def ranking_state(*args) -> tuple:
    """A worker's ``(reference, inputs, calibration batches)``: :func:`load_ranking` in the worker."""
    _, reference, batch, calibration = load_ranking(*args)
    return reference, batch, calibration.batches if calibration else None


@click.command("sensitivity", short_help="Rank layer groups by the damage a format does to each alone.",
               help="Rank every quantizable layer group of MODEL (q/k/v and gate/up together, as vLLM fuses "
               "them) by the damage each --to format does when only that group is quantized: mean KL of "
               "the outputs for LMs (nats), relative output noise power for encoders; with the bytes each "
               "choice stores. Default input: the first 8 windows of the calibration text.\n\n"
               "Examples:\n\n  dtypelab sensitivity smollm2 --to int4:g64,int8\n\n"
               "  dtypelab sensitivity minilm --to int4:g128,fp8_e4m3 --exact --windows 2\n\n" + MODEL_HELP)
@click.argument("model")
@click.option("--to", "formats", default="int4:g128,int8", show_default=True,
              help="Comma-separated quantized formats to rank.")
@ranking_options
@result_options
def sensitivity_cmd(model: str, formats: str, as_json: bool, columns: tuple[str, ...] | None,
                    html_path: str | None = None, **options) -> None:
    check_result_options(as_json, columns, html_path, sources=[model])
    _, result, _ = rank(model, formats, **options)
    emit(result, as_json, html_side_output(result, html_path, model=model), columns=columns)
