"""``dtypelab demo``: the seed notebook replayed with the library, then minilm in four formats."""

from __future__ import annotations

import tempfile
from pathlib import Path

import click
import torch

from ..analysis import compare_models, run_model, select_output
from ..checkpoint import convert_checkpoint
from ..models import ModelKind, OutputKind, build_model, default_input, load, minilm_path, model_inputs
from ..quant import cast_model, param_dtype_lines
from .compare import compare_loaded


@click.command("demo", short_help="Replay the seed notebook, then minilm in four formats, offline.")
@click.option("--seed-only", is_flag=True, help="Only the seed notebook replay (skip minilm).")
def demo_cmd(seed_only: bool) -> None:
    """Replay the seed notebook with the library, then compare the built-in minilm in fp16, bf16, int8 and
    int4, and convert its checkpoint to int4 (compressed-tensors) in a temporary folder."""
    model, inputs = build_model("dummy"), default_input("dummy")
    variants = {"fp16": cast_model(model, "fp16"), "bf16": cast_model(model, "bf16")}
    for name, m in [("fp32", model), *variants.items()]:
        click.echo(f"== {name}: parameter dtypes")
        click.echo("\n".join(param_dtype_lines(m)))
        click.echo(f"logits ({name}):\n{select_output(run_model(m, inputs))}\n")
    result = compare_models(model, variants, inputs, output_kind=OutputKind.LOGITS,
                            model_kind=ModelKind.MODULE)
    bf16 = result.variants[1].metrics
    click.echo(f"Mean diff: {bf16.mean_abs_diff} | Max diff: {bf16.max_abs_diff}\n")
    click.echo(result.to_text())
    if not seed_only:
        loaded = load("minilm", "fp32")
        click.echo("\n== minilm (all-MiniLM-L6-v2) on dtypelab's 64 bundled sentences")
        click.echo(compare_loaded(loaded, "fp16,bf16,int8,int4:g128", model_inputs(loaded),
                                  torch.device("cpu")).to_text())
        with tempfile.TemporaryDirectory() as folder:
            click.echo("\n== minilm's checkpoint converted to int4:g128 (compressed-tensors, streamed)")
            click.echo(convert_checkpoint(minilm_path(), Path(folder) / "minilm-int4", "int4:g128",
                                          verify=True).to_text())
