"""Real result documents of every kind with an HTML view, shared by the report tests."""

from __future__ import annotations

import contextlib
import io
import json

import pytest

import dtypelab
from dtypelab.models import model_inputs

RANK = ["--text-set", "calibration", "--ctx", "64", "--windows", "1"]


@pytest.fixture(scope="module")
def documents(tmp_path_factory) -> dict[str, dict]:
    """One real document per kind with a view, from tiny-llama (small, causal: next-token report too)."""
    loaded = dtypelab.load("tiny-llama")
    inputs = model_inputs(loaded, text_set="evaluation", ctx=64, windows=1)
    comparison = dtypelab.compare_models(loaded.model, dtypelab.build_variants(loaded.model, "bf16,int4:g64"),
                                         inputs, output_kind="logits", model_kind=loaded.kind)
    layers = dtypelab.compare_layers(loaded.model, dtypelab.build_variants(loaded.model, "bf16,int8"), inputs,
                                     output_kind="logits")
    headroom = dtypelab.predict_headroom(loaded.model, inputs, ["fp16"])
    folder = tmp_path_factory.mktemp("html") / "src"
    loaded.model.save_pretrained(folder)
    converted = dtypelab.convert_checkpoint(folder, folder.parent / "out", "int4:g32")
    results = {"comparison": comparison, "layers": layers, "headroom": headroom, "conversion": converted}
    return {kind: json.loads(result.to_json()) for kind, result in results.items()}


@pytest.fixture(scope="module")
def plan_documents(tmp_path_factory) -> dict[str, dict]:

    from dtypelab.cli import main

    out = {}
    for kind, budget in (("plan", "0.35x"), ("plan-sweep", "0.3:0.45:0.05x")):
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed), contextlib.suppress(SystemExit):
            main(["plan", "tiny-llama", "--budget", budget, "--formats", "int4:g64,int8", *RANK, "--json"])
        out[kind] = json.loads(printed.getvalue())
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed), contextlib.suppress(SystemExit):
        main(["sensitivity", "tiny-llama", "--to", "int4:g64,int8", *RANK, "--json"])
    out["sensitivity"] = json.loads(printed.getvalue())
    return out


