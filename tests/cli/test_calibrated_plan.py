"""plan / sensitivity with :gptq / :awq candidates: the plan's --verify figure is the row compare --plan
prints for it, the calibration is recorded in the plan, and the options are refused without such a format.

Truth: `compare --plan` (an independent path: the plan file read back, the model quantized again on the
same calibration batches) and the documented option rules.
"""

from __future__ import annotations

import json

import pytest

from helpers import run_cli

CALIB = ["--calib-tokens", "256"]
RANK = ["--text-set", "calibration", "--ctx", "64", "--windows", "2"]


@pytest.fixture(scope="module")
def planned(tmp_path_factory):
    """A 0.3x plan of tiny-llama from int4:g64 (RTN and GPTQ) and int8, verified on 1 held-out window
    (of --ctx 64, the ranking's). Module-scoped, so main() is run directly (capsys is per test)."""
    path = tmp_path_factory.mktemp("plan") / "plan.json"
    import contextlib
    import io

    from dtypelab.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
        main(["plan", "tiny-llama", "--budget", "0.3x", "--formats", "int4:g64,int4:g64:gptq,int8", *RANK,
              *CALIB, "-o", str(path), "--verify", "--verify-windows", "1", "--json"])
    return json.loads(out.getvalue()), json.loads(path.read_text())


def test_the_plan_takes_gptq_layers_and_records_its_calibration(planned):
    _, plan = planned
    formats = {entry["format"] for entry in plan["layers"].values()}
    assert "int4:g64:gptq" in formats  # at 0.3x GPTQ's lower damage wins groups from RTN at equal bytes
    assert plan["calibration"]["tokens"] == 256 and plan["calibration"]["source"] == "calibration text"


def test_compare_plan_measures_what_plan_verify_measured(planned, tmp_path, capsys):
    result, plan = planned
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(plan))
    code, out, err = run_cli(capsys, "compare", "tiny-llama", "--plan", path, *CALIB, "--text-set",
                             "evaluation", "--ctx", "64", "--windows", "1", "--to", "bf16", "--json")
    assert code == 0, err
    row = next(v for v in json.loads(out)["variants"] if v["name"] == "plan:plan")
    assert row["calibration"]["method"] == "gptq"
    # the same planned model on the same windows: equal up to float32 summation order
    assert row["next_token"]["kl_mean"] == pytest.approx(result["measured"]["damage"], rel=1e-6)
    assert row["stored_bytes"] == result["measured"]["stored_bytes"]


def test_a_calibrated_plan_without_calibration_in_compare_is_a_failed_row_not_rtn(planned, tmp_path):
    """The library refuses to apply a :gptq layer without inputs (never silently rounds it)."""
    from dtypelab import load
    from dtypelab.quant import MixedPlan
    from dtypelab.variants import plan_variant

    _, plan = planned
    variant = plan_variant(load("tiny-llama").model, MixedPlan.from_dict(plan))
    assert not variant.ok and "calibration inputs" in variant.failure


def test_calibration_options_need_a_calibrated_candidate(capsys):
    code, _, err = run_cli(capsys, "sensitivity", "tiny-llama", "--to", "int8", *RANK, *CALIB)
    assert code == 2 and "none is asked for" in err and len(err.strip().splitlines()) == 1


def test_sensitivity_scores_a_calibrated_format(capsys):
    code, out, err = run_cli(capsys, "sensitivity", "tiny-llama", "--to", "int4:g64,int4:g64:awq", *RANK,
                             *CALIB, "--json")
    assert code == 0, err
    scores = json.loads(out)["scores"]
    awq = [s for s in scores if s["fmt"] == "int4:g64:awq"]
    assert len(awq) == 8 and all(s["predicted"] is not None and s["predicted"] > 0 for s in awq)
