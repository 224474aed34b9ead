"""``dtypelab demo``: the seed notebook replayed with the library, then minilm in four formats."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import click

from .. import analysis, checkpoint, models, quant, variants
from ..errors import ModelSpecError
from ..lazy import lazy_module
from ..report import run_facts, write_html
from .compare import compare_loaded

torch = lazy_module("torch")  # imported when a command runs, not for its --help


@click.command("demo", short_help="Replay the seed notebook, then minilm and smollm2, offline.")
@click.option("--seed-only", is_flag=True, help="Only the seed notebook replay (skip minilm, smollm2).")
@click.option("--reports", "reports_dir", type=click.Path(file_okay=False),
              help="Folder for the demo's HTML reports [default: a new temporary folder, kept].")
def demo_cmd(seed_only: bool, reports_dir: str | None = None) -> None:
    """Replay the seed notebook with the library, then compare the built-in minilm in fp16, bf16, int8 and
    int4, convert its checkpoint to int4 (compressed-tensors) in a temporary folder, and compare smollm2
    on the held-out text; the seed model's and minilm's per-layer comparisons are written as HTML reports,
    whose paths end the output."""
    model, inputs = models.build_model("dummy"), models.default_input("dummy")
    candidates = {"fp16": quant.cast_model(model, "fp16"), "bf16": quant.cast_model(model, "bf16")}
    for name, m in [("fp32", model), *candidates.items()]:
        click.echo(f"== {name}: parameter dtypes")
        click.echo("\n".join(quant.param_dtype_lines(m)))
        click.echo(f"logits ({name}):\n{analysis.select_output(analysis.run_model(m, inputs))}\n")
    result = analysis.compare_models(model, candidates, inputs, output_kind=models.OutputKind.LOGITS,
                                     model_kind=models.ModelKind.MODULE)
    bf16 = result.variants[1].metrics
    click.echo(f"Mean diff: {bf16.mean_abs_diff} | Max diff: {bf16.max_abs_diff}\n")
    click.echo(result.to_text())
    report_dir = Path(reports_dir or tempfile.mkdtemp(prefix="dtypelab-demo-reports-"))
    report_dir.mkdir(parents=True, exist_ok=True)
    seed_layers = analysis.compare_layers(model, candidates, inputs, output_kind=models.OutputKind.LOGITS)
    reports = [_report(report_dir / "seed-layers.html", seed_layers)]
    if not seed_only:
        loaded = models.load("minilm", "fp32")
        click.echo("\n== minilm (all-MiniLM-L6-v2) on dtypelab's 64 bundled sentences")
        click.echo(compare_loaded(loaded, "fp16,bf16,int8,int4:g128", models.model_inputs(loaded),
                                  torch.device("cpu")).to_text())
        with tempfile.TemporaryDirectory() as folder:
            click.echo("\n== minilm's checkpoint converted to int4:g128 (compressed-tensors, streamed)")
            converted = checkpoint.convert_checkpoint(models.minilm_path(), Path(folder) / "minilm-int4",
                                                      "int4:g128", verify=True)
            click.echo(converted.to_text())
        minilm_candidates = variants.build_variants(loaded.model, "bf16,int8,int4:g128")
        minilm_layers = analysis.compare_layers(loaded.model, minilm_candidates, models.model_inputs(loaded),
                                                output_kind=loaded.output_kind)
        reports.append(_report(report_dir / "minilm-layers.html", minilm_layers))
        _smollm2()
    click.echo("\n== HTML reports (open in any browser, offline)")
    click.echo("\n".join(str(path) for path in reports))


def _report(path: Path, result) -> Path:
    """``result`` written as its HTML report at ``path`` (what ``--html`` writes)."""
    write_html(path, json.loads(result.to_json()), run_facts(["dtypelab", "demo"]))
    return path


SMOLLM2_DEMO_WINDOWS = 4  # of the held-out text's 29: the demo stays ~1 min; the full text is the default


def _smollm2() -> None:
    """SmolLM2-135M on the held-out text in bf16, int8 and int4:g64 (g128 does not divide its 576-wide
    layers), with the llama.cpp-style next-token report; a missing package is a line, not a failure."""
    try:
        loaded = models.load("smollm2", "fp32")
    except ModelSpecError as exc:
        click.echo(f"\n== smollm2 skipped: {exc}")
        return
    click.echo(f"\n== smollm2 (SmolLM2-135M, a real causal LM) on the first {SMOLLM2_DEMO_WINDOWS} windows "
               "of 512 tokens of the held-out text")
    inputs = models.model_inputs(loaded, text_set="evaluation", windows=SMOLLM2_DEMO_WINDOWS)
    click.echo(compare_loaded(loaded, "bf16,int8,int4:g64", inputs, torch.device("cpu")).to_text())
