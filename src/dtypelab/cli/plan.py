"""``dtypelab plan``: a format per layer group that fits a byte budget with the least predicted damage."""

from __future__ import annotations

import functools

import click

from .. import analysis, models, quant
from ..errors import InputError
from ..executor import Executor, InProcess, executor_for
from ..formats import get_format, split_list
from ..report import plot_pareto
from .common import (
    MODEL_HELP,
    check_output,
    check_plot,
    check_result_options,
    emit,
    html_side_output,
    resolve_device,
    result_options,
)
from .sensitivity import load_ranking, rank, ranking_options


@click.command("plan", short_help="Choose a format per layer to fit a byte budget with the least damage.",
               help="Rank MODEL's layer groups (as `sensitivity` does, on the calibration text), then choose "
               "a format or dense for each so the plan fits --budget with the least predicted damage, "
               "counting every byte convert writes (elements, scales, zero points). --budget: bits per "
               "weight over the planned layers (4.5bpw), checkpoint bytes (80MB, 80MiB), a fraction of the "
               "float32 checkpoint (0.3x), or a sweep START:STOP:STEP (4.25:8:0.25bpw). --verify measures "
               "the planned model on the held-out evaluation text. A :gptq / :awq candidate is scored "
               "with the codes its calibration chooses (--calib-file / --calib-tokens, as compare and "
               "convert take them: give `convert --plan` the same ones).\n\n"
               "Examples:\n\n  dtypelab plan smollm2 --budget 5bpw --formats int4:g64,int8 -o plan.json\n\n"
               "  dtypelab convert FOLDER -o OUT --plan plan.json\n\n"
               "  dtypelab plan smollm2 --budget 4.5:8:0.5bpw --formats int4:g64,int8 --verify\n\n"
               + MODEL_HELP)
@click.argument("model")
@click.option("--budget", required=True, help="4.5bpw, 80MB, 0.3x, or a sweep 4.25:8:0.25bpw.")
@click.option("--formats", default="int4:g128,int8", show_default=True,
              help="Candidate formats (convert must write them); dense is always a candidate.")
@click.option("--keep", "keep_dense", multiple=True, help="Layers or groups (globs) the plan keeps dense.")
@click.option("--min-format", "min_formats", multiple=True, metavar="PATTERN=FORMAT",
              help="Layers matching PATTERN take at least FORMAT (as many bytes or more), e.g. "
                   "'*down_proj=int8'; FORMAT may be dense.")
@click.option("--edges", metavar="N=FORMAT",
              help="The first and last N blocks take at least FORMAT, e.g. 1=int8.")
@click.option("-o", "--output", "output", type=click.Path(dir_okay=False),
              help="Write the plan as JSON (one budget only), for compare / convert --plan.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False),
              help="With a sweep: write bytes against damage (measured with --verify) to this .png / .svg.")
@click.option("--verify", is_flag=True,
              help="Measure each plan (and, for a sweep, each uniform format) on the held-out text.")
@click.option("--verify-windows", type=int,
              help="With --verify: only the first N windows of the held-out text [default: all].")
@ranking_options
@result_options
def plan_cmd(model: str, budget: str, formats: str, keep_dense: tuple[str, ...], min_formats: tuple[str, ...],
             edges: str | None, output: str | None, plot_path: str | None, verify: bool,
             verify_windows: int | None, as_json: bool, columns: tuple[str, ...] | None = None,
             html_path: str | None = None, **options) -> None:
    check_result_options(as_json, columns, html_path, sources=[model])
    budgets = analysis.parse_budgets(budget)
    if output and len(budgets) > 1:
        raise InputError("-o writes one plan: give one --budget, not a sweep")
    if plot_path and len(budgets) == 1:
        raise InputError("--plot draws a sweep: give --budget START:STOP:STEP (e.g. 4.5:8:0.5bpw)")
    check_plot(plot_path)
    if verify_windows is not None and not verify:
        raise InputError("--verify-windows needs --verify: add --verify or drop it")
    target = check_output(output, "-o", suffixes=(".json",)) if output else None
    floors, edge = _pairs(min_formats, "--min-format"), _edges(edges)
    for fmt in [*floors.values(), *([edge[1]] if edge else [])]:
        if fmt != quant.DENSE:
            get_format(fmt)  # a typo is refused before the model loads
    executor, options = _executor(verify, options)
    loaded, ranking, calibration = rank(model, formats, **options)
    reference = loaded.model
    planned_layers = [n for g in ranking.groups for n in g.layers]
    fingerprint = quant.model_fingerprint(quant.layer_weights(reference, planned_layers))
    plans = [analysis.plan_model(ranking, b, keep=keep_dense, min_formats=floors, edges=edge, model=model,
                                 model_hash=fingerprint) for b in budgets]
    for result in plans if calibration is not None else []:  # what compare / convert --plan calibrate on
        result.plan.extra["calibration"] = calibration.settings()
    uniform_candidates = (analysis.uniform_plans(ranking, model, fingerprint) if verify and len(plans) > 1
                          else {})
    measured_uniform = []
    if verify:
        text = "the held-out evaluation text" if loaded.tokenizer is not None else "the default input"
        candidates = [result.plan for result in plans] + list(uniform_candidates.values())
        if isinstance(executor, InProcess):
            held_out = _held_out(loaded, options["device"], options["ctx"], verify_windows)
            measured = [analysis.measure_plan(reference, plan, held_out, text=text,
                                              output_kind=loaded.output_kind, model_kind=loaded.kind,
                                              calibration=calibration) for plan in candidates]
        else:
            measured = _measure_on(executor, candidates, model, formats, verify_windows, loaded, text,
                                   options)
        for result, measurement in zip(plans, measured, strict=False):
            result.measured = measurement
        measured_uniform = measured[len(plans):]
    if len(plans) == 1:
        saved = [("-o", output, lambda: plans[0].plan.save(target))] if target else []
        emit(plans[0], as_json, saved + html_side_output(plans[0], html_path, model=model), columns=columns)
        return
    uniform = [(fmt, plan, m) for (fmt, plan), m in zip(uniform_candidates.items(), measured_uniform,
                                                       strict=True)]
    sweep = analysis.PlanSweep(plans, uniform, ranking.fixed_bytes)
    label = "KL (nats)" if ranking.metric == "kl_nats" else "relative noise power"
    plot = [("--plot", plot_path, lambda: plot_pareto(sweep.pareto_points(), plot_path, label))] \
        if plot_path else []
    emit(sweep, as_json, plot + html_side_output(sweep, html_path, model=model), columns=columns)


RANKING_ONLY = ("method", "exact", "exclude", "head", "seed", "workers", "ray_address", "worker_threads")
"""rank()'s options that are not its inputs' (the rest are input options)."""


def _executor(verify: bool, options: dict) -> tuple[Executor, dict]:
    """The executor of ``--workers`` / ``--ray`` (the exact sweep's and --verify's measurements, one task
    per plan), and rank's options: without the exact sweep, the executor is --verify's alone."""
    workers, ray_address = options["workers"], options["ray_address"]
    exact = options["exact"] or options["method"] == "exact"
    if (workers is not None or ray_address is not None) and not (exact or verify):
        raise InputError("--workers and --ray run the exact sweep (--exact) and --verify's measurements: "
                         "add one of them, or drop --workers / --ray")
    executor = executor_for(workers, ray_address, threads=options["worker_threads"])
    return executor, options if exact else {**options, "workers": None, "ray_address": None,
                                            "worker_threads": 1}


def _measure_on(executor: Executor, plans: list, model: str, formats: str, verify_windows: int | None,
                loaded, text: str, options: dict) -> list[dict]:
    """--verify's measurements as tasks: each worker loads the model, the held-out text and the
    calibration once (:func:`plan_state`)."""
    fmts = [get_format(f) for f in split_list(formats)]
    inputs = {k: v for k, v in options.items() if k not in (*RANKING_ONLY, "allow_pickle", "device",
                                                            "calib_file", "calib_tokens")}
    state = functools.partial(plan_state, model, options["allow_pickle"], options["device"], fmts,
                              options["calib_file"], options["calib_tokens"], inputs, verify_windows)
    setup = analysis.CompareSetup(state, output_kind=loaded.output_kind, model_kind=loaded.kind)
    return analysis.measure_plans(plans, executor, setup, text=text)


def plan_state(model: str, allow_pickle: bool, device: str, fmts: list, calib_file: str | None,
               calib_tokens: int | None, inputs: dict, verify_windows: int | None) -> tuple:
    """A worker's ``(reference, held-out inputs, calibration)``: loaded as ``plan`` loads them here."""
    loaded, reference, _, calibration = load_ranking(model, allow_pickle, device, fmts, calib_file,
                                                     calib_tokens, inputs)
    return reference, _held_out(loaded, device, inputs["ctx"], verify_windows), calibration


def _held_out(loaded, device: str, ctx: int | None, windows: int | None):
    """The evaluation text (windows of the ranking's --ctx; all of them unless --verify-windows) for a
    model with a tokenizer, else its default input."""
    if loaded.tokenizer is None:
        return models.to_device(models.model_inputs(loaded), resolve_device(device))
    return models.to_device(models.model_inputs(loaded, text_set="evaluation", ctx=ctx, windows=windows),
                            resolve_device(device))


def _pairs(items: tuple[str, ...], option: str) -> dict[str, str]:
    pairs = {}
    for item in items:
        pattern, sep, fmt = item.rpartition("=")
        if not sep or not pattern or not fmt:
            raise InputError(f"{option} {item!r}: write PATTERN=FORMAT, e.g. '*down_proj=int8'")
        pairs[pattern] = fmt
    return pairs


def _edges(text: str | None) -> tuple[int, str] | None:
    if text is None:
        return None
    count, sep, fmt = text.partition("=")
    if not sep or not count.isdigit() or not fmt:
        raise InputError(f"--edges {text!r}: write N=FORMAT, e.g. 1=int8 (the first and last block)")
    return int(count), fmt
