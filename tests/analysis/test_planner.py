"""The budget solver against brute force, budgets and their edge cases, and plans end to end.

Truth: exhaustive enumeration of every combination (small random instances), hand-computed budgets,
and the bytes ``convert --plan`` writes and ``dtypelab.load`` reads back.
"""

from __future__ import annotations

import itertools
import json
import math
import random

import pytest
import torch

import dtypelab
from dtypelab.analysis import (
    Budget,
    Choice,
    measure_plan,
    parse_budget,
    parse_budgets,
    plan_model,
    sensitivity,
    solve,
    uniform_plans,
)
from dtypelab.checkpoint import convert_checkpoint, stored_nbytes
from dtypelab.errors import InputError
from dtypelab.models import model_inputs
from dtypelab.quant import DENSE, MixedPlan, layer_weights, model_fingerprint, quantize_model
from helpers import run_cli


def _brute_force(options, limit):
    best = None
    for combo in itertools.product(*[range(len(o)) for o in options]):
        nbytes = sum(options[g][c].stored_bytes for g, c in enumerate(combo))
        if nbytes > limit:
            continue
        damage = sum(options[g][c].damage for g, c in enumerate(combo))
        if best is None or (damage, nbytes) < best[:2]:
            best = (damage, nbytes, combo)
    return best


@pytest.mark.parametrize("seed", range(40))
def test_the_solver_reaches_the_brute_force_optimum(seed):
    rng = random.Random(seed)
    groups = rng.randint(1, 7)
    options = [[Choice(f"c{j}", rng.randint(1, 60), rng.choice([0.0, rng.random(), round(rng.random(), 1)]))
                for j in range(rng.randint(1, 4))] for _ in range(groups)]
    smallest = sum(min(c.stored_bytes for c in o) for o in options)
    largest = sum(max(c.stored_bytes for c in o) for o in options)
    limit = rng.randint(smallest, largest)
    picks = solve(options, limit)
    damage = sum(options[g][c].damage for g, c in enumerate(picks))
    nbytes = sum(options[g][c].stored_bytes for g, c in enumerate(picks))
    truth = _brute_force(options, limit)
    assert nbytes <= limit
    # the same optimum (damage, then bytes); sums of the same floats in another order: 1e-12
    assert damage == pytest.approx(truth[0], abs=1e-12) and nbytes == truth[1]


def test_the_solver_refuses_a_budget_nothing_fits():
    with pytest.raises(InputError, match="no plan fits 9 bytes: the smallest takes 10"):
        solve([[Choice("a", 5, 1.0)], [Choice("b", 5, 0.0), Choice("c", 8, 0.0)]], 9)


def test_the_solver_takes_the_exact_budget_at_the_boundary():
    options = [[Choice("dense", 40, 0.0), Choice("int4", 10, 3.0)], [Choice("dense", 40, 0.0),
                                                                        Choice("int4", 10, 1.0)]]
    assert solve(options, 50) == [0, 1]  # 40 + 10 = 50 fits exactly: the costlier group stays dense
    assert solve(options, 49) == [1, 1]
    assert solve(options, 80) == [0, 0]


@pytest.mark.parametrize(("text", "kind", "value"), [
    ("4.5bpw", "bpw", 4.5), ("80MB", "bytes", 80e6), ("80MiB", "bytes", 80 * 2**20), ("0.3x", "ratio", 0.3),
    ("1000", "bytes", 1000), (" 6 BPW ", "bpw", 6.0),
])
def test_budgets_parse(text, kind, value):
    budget = parse_budget(text)
    assert (budget.kind, budget.value) == (kind, value)


@pytest.mark.parametrize("text", ["", "4.5 bits", "-3bpw", "0x", "abc", "4.5.5bpw"])
def test_a_budget_that_cannot_be_read_is_one_line(text):
    with pytest.raises(InputError, match="cannot read budget") as info:
        parse_budget(text)
    assert "\n" not in str(info.value)


def test_a_budget_sweep_includes_its_stop():
    assert [b.value for b in parse_budgets("4.25:5:0.25bpw")] == [4.25, 4.5, 4.75, 5.0]
    assert [b.kind for b in parse_budgets("0.2:0.3:0.05x")] == ["ratio"] * 3
    with pytest.raises(InputError, match="gives 0 budgets"):
        parse_budgets("6:5:0.5bpw")


def test_budget_limits_by_hand():
    # 1,000 planned weights, 300 fixed bytes, a 10,000-byte float32 checkpoint
    assert Budget("4.5bpw", "bpw", 4.5).planned_limit(1000, 300, 10_000) == 562  # floor(4.5 * 1000 / 8)
    assert Budget("2000", "bytes", 2000).planned_limit(1000, 300, 10_000) == 1700
    assert Budget("0.25x", "ratio", 0.25).planned_limit(1000, 300, 10_000) == 2200


# ------------------------------------------------------------------------------- on tiny-llama

@pytest.fixture(scope="module")
def ranked():
    loaded = dtypelab.load("tiny-llama")
    inputs = model_inputs(loaded, text_set="calibration", ctx=128, windows=2)
    return loaded, sensitivity(loaded.model, "int4:g64,int8", inputs)


def test_a_plan_meets_its_budget_to_the_byte_and_quantize_model_stores_it(ranked):
    loaded, result = ranked
    planned = plan_model(result, "5bpw", model="tiny-llama")
    assert planned.planned_bytes <= planned.limit_bytes == math.floor(5 * planned.planned_numel / 8)
    model = quantize_model(loaded.model, planned.plan).model
    assert stored_nbytes(model) == planned.checkpoint_bytes == planned.plan.stored_bytes + result.fixed_bytes
    formats = {name: type(model.get_submodule(name)).__name__ for name in planned.plan.layers}
    assert {formats[n] for n, c in planned.plan.layers.items() if c.fmt != DENSE} == {"QuantizedLinear"}
    assert {c.fmt for c in planned.plan.layers.values()} >= {"int4:g64", "int8"}  # a real mix at 5 bpw


def test_a_larger_budget_never_predicts_more_damage(ranked):
    _, result = ranked
    damages = [plan_model(result, f"{bits}bpw").predicted_damage for bits in (4.5, 5, 6, 8, 12, 31)]
    assert damages == sorted(damages, reverse=True) and damages[-1] < damages[0]


@pytest.mark.parametrize(("budget", "message"), [
    ("4bpw", r"outside what a plan can take here \(4\.2\d*bpw to 32bpw"),
    ("33bpw", "outside what a plan can take here"),
    ("1000", "outside what a plan can take here"),
])
def test_a_budget_outside_the_feasible_range_says_the_range(ranked, budget, message):
    with pytest.raises(InputError, match=message) as info:
        plan_model(ranked[1], budget)
    assert "\n" not in str(info.value)


def test_constraints_narrow_the_choices(ranked):
    _, result = ranked
    planned = plan_model(result, "10bpw", keep=["*o_proj"], min_formats={"*down_proj": "int8"},
                         edges=None)
    rows = {r.group: r for r in planned.rows}
    assert all(r.fmt == DENSE and r.constraint == "kept (--keep)" for g, r in rows.items() if "o_proj" in g)
    assert all(r.fmt in ("int8", DENSE) for g, r in rows.items() if "down_proj" in g)
    edged = plan_model(result, "9bpw", edges=(1, "int8"))
    assert all(r.fmt in ("int8", DENSE) for r in edged.rows)  # two blocks: both are edges


def test_a_plan_with_a_format_convert_cannot_write_is_refused():
    loaded = dtypelab.load("tiny-llama")
    inputs = model_inputs(loaded, texts=["Hello there, general."])
    with pytest.raises(InputError, match="plan candidates must be formats convert writes; nf4 has no"):
        plan_model(sensitivity(loaded.model, "nf4", inputs), "5bpw")


def test_a_plan_round_trips_through_its_file_and_refuses_another_model(ranked, tmp_path):
    loaded, result = ranked
    weights = layer_weights(loaded.model, [n for g in result.groups for n in g.layers])
    planned = plan_model(result, "5bpw", model="tiny-llama", model_hash=model_fingerprint(weights)).plan
    planned.save(tmp_path / "plan.json")
    again = MixedPlan.load(tmp_path / "plan.json")
    assert again.layers == planned.layers and again.model_hash == planned.model_hash
    again.check_model(loaded.model)
    other = dtypelab.load("tiny-llama").model
    with torch.no_grad():
        other.model.layers[0].mlp.down_proj.weight.mul_(1.001)
    with pytest.raises(InputError, match="made for another model \\(fingerprint"):
        again.check_model(other)
    with pytest.raises(InputError, match="names layer 'model.layers.0.self_attn.q_proj', which this model"):
        again.check_model(dtypelab.load("tiny-gpt2").model)


@pytest.mark.parametrize(("content", "message"), [
    ("not json", "cannot read plan"), ('{"schema": "other"}', "is not a dtypelab plan"),
    ('{"schema": "dtypelab/plan/1", "layers": {}}', "lists no layers"),
    ('{"schema": "dtypelab/plan/1", "layers": {"a": {"format": 4}}}', "needs a \"format\" string"),
    ("[" * 5000 + "]" * 5000, "cannot read plan"),
])
def test_a_broken_plan_file_is_one_line(tmp_path, content, message):
    path = tmp_path / "plan.json"
    path.write_text(content)
    with pytest.raises(InputError, match=message) as info:
        MixedPlan.load(path)
    assert "\n" not in str(info.value)


def test_uniform_plans_are_what_compare_measures(ranked):
    loaded, result = ranked
    plan = uniform_plans(result)["int8"]
    assert stored_nbytes(quantize_model(loaded.model, plan).model) == plan.stored_bytes + result.fixed_bytes
    assert stored_nbytes(quantize_model(loaded.model, "int8").model) == plan.stored_bytes + result.fixed_bytes


# ------------------------------------------------------------------------------- convert --plan

@pytest.fixture(scope="module")
def planned_folder(tmp_path_factory, ranked):
    loaded, result = ranked
    folder = tmp_path_factory.mktemp("plan") / "tiny-llama"
    loaded.model.save_pretrained(folder)
    weights = layer_weights(loaded.model, [n for g in result.groups for n in g.layers])
    planned = plan_model(result, "5bpw", model="tiny-llama", model_hash=model_fingerprint(weights))
    planned.plan.save(folder.parent / "plan.json")
    return folder, folder.parent / "plan.json", planned


def test_convert_writes_the_plan_with_one_config_group_per_scheme(planned_folder, tmp_path):
    folder, plan_file, planned = planned_folder
    convert_checkpoint(folder, tmp_path / "out", None, plan=plan_file, verify=True)
    config = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    groups = {g["weights"]["num_bits"]: sorted(g["targets"]) for g in config["config_groups"].values()}
    plan = planned.plan
    assert groups == {bits: sorted(n for n, c in plan.layers.items() if c.fmt == fmt)
                      for bits, fmt in [(4, "int4:g64"), (8, "int8")]}
    loaded = dtypelab.load(str(tmp_path / "out")).model
    assert stored_nbytes(loaded) == planned.checkpoint_bytes  # to the byte
    ours = quantize_model(dtypelab.load(str(folder)).model, plan).model
    ids = torch.tensor([[1, 5, 9, 30, 2, 77, 12]])
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, ours(ids).logits)  # the checkpoint holds what was measured


def test_transformers_with_compressed_tensors_loads_a_planned_checkpoint(planned_folder, tmp_path):
    pytest.importorskip("compressed_tensors")
    import transformers

    folder, plan_file, _ = planned_folder
    convert_checkpoint(folder, tmp_path / "out", None, plan=plan_file)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    ours = dtypelab.load(str(tmp_path / "out")).model
    ids = torch.tensor([[1, 5, 9, 30, 2, 77, 12]])
    with torch.no_grad():
        assert torch.equal(theirs(ids).logits, ours(ids).logits)


def test_convert_refuses_a_plan_for_other_weights_before_writing(planned_folder, tmp_path):
    folder, plan_file, _ = planned_folder
    other = tmp_path / "other"
    model = dtypelab.load(str(folder)).model
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight.add_(1e-3)
    model.save_pretrained(other)
    with pytest.raises(InputError, match="made for other weights"):
        convert_checkpoint(other, tmp_path / "out", None, plan=plan_file)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("edit", "message"), [
    (lambda d: d["layers"].update({"model.layers.9.mlp.up_proj": {"format": "int8", "bytes": 1}}),
     "names layer 'model.layers.9.mlp.up_proj', which is no Linear layer"),
    (lambda d: d["layers"]["model.layers.0.mlp.down_proj"].update(format="int4:g96"),
     "cannot hold it: .*96"),
    (lambda d: d["layers"]["model.layers.0.mlp.down_proj"].update(format="nf4"),
     "nf4 has no compressed-tensors layout"),
])
def test_convert_refuses_a_plan_a_layer_cannot_take(planned_folder, tmp_path, edit, message):
    folder, plan_file, _ = planned_folder
    data = json.loads(plan_file.read_text())
    data["model_hash"] = ""
    edit(data)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(data))
    with pytest.raises(InputError, match=message):
        convert_checkpoint(folder, tmp_path / "out", None, plan=bad)
    assert not (tmp_path / "out").exists()


def test_convert_takes_a_format_or_a_plan_not_both(planned_folder, tmp_path, capsys):
    folder, plan_file, _ = planned_folder
    with pytest.raises(InputError, match="--to and --plan both"):
        convert_checkpoint(folder, tmp_path / "out", "int8", plan=plan_file)
    code, _, err = run_cli(capsys, "convert", str(folder), "-o", str(tmp_path / "o2"))
    assert code == 2 and "--to" in err and "--plan" in err and len(err.strip().splitlines()) == 1


# ------------------------------------------------------------------------------- verify and CLI

def test_verify_measures_the_plan_it_predicted(ranked):
    loaded, result = ranked
    planned = plan_model(result, "6bpw")
    held_out = model_inputs(loaded, text_set="evaluation", ctx=128, windows=2)
    measured = measure_plan(loaded.model, planned.plan, held_out, model_kind=loaded.kind)
    assert measured["stored_bytes"] == planned.checkpoint_bytes
    assert measured["damage"] > 0 and measured["stderr"] > 0
    # second order and additive: on a random 2-layer model the prediction holds within a factor of 3
    assert planned.predicted_damage / 3 < measured["damage"] < 3 * planned.predicted_damage


def test_plan_cli_writes_a_plan_compare_and_convert_read(capsys, tmp_path):
    plan_file = tmp_path / "p.json"
    code, out, err = run_cli(capsys, "plan", "tiny-llama", "--budget", "5bpw", "--formats", "int4:g64,int8",
                             "--windows", "1", "--ctx", "128", "-o", str(plan_file))
    assert code == 0, err
    assert "Mixed-precision plan" in out and plan_file.is_file()
    code, out, err = run_cli(capsys, "compare", "tiny-llama", "--to", "int8", "--plan", str(plan_file),
                             "--json")
    assert code == 0, err
    rows = {v["name"]: v for v in json.loads(out)["variants"]}
    assert rows["plan:p"]["stored_bytes"] == MixedPlan.load(plan_file).stored_bytes + 535_552


@pytest.mark.parametrize(("argv", "message"), [
    (["plan", "tiny-llama", "--budget", "5 bits"], "cannot read budget"),
    (["plan", "tiny-llama", "--budget", "1bpw", "--formats", "int8", "--windows", "1", "--ctx", "64"],
     "outside what a plan can take"),
    (["plan", "tiny-llama", "--budget", "5bpw", "--min-format", "nosep"], "write PATTERN=FORMAT"),
    (["plan", "tiny-llama", "--budget", "5bpw", "--min-format", "*=int9"], "int9"),
    (["plan", "tiny-llama", "--budget", "4:5:0.5bpw", "-o", "x.json"], "-o writes one plan"),
    (["sensitivity", "tiny-llama", "--to", "bf16"], "plain dtype"),
])
def test_plan_and_sensitivity_bad_input_is_one_line_exit_2(capsys, argv, message):
    code, out, err = run_cli(capsys, *argv)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_a_sweep_with_verify_draws_plans_beside_uniform_formats(capsys, tmp_path):
    pytest.importorskip("matplotlib")
    chart = tmp_path / "pareto.svg"
    code, out, err = run_cli(capsys, "plan", "tiny-llama", "--budget", "5:7:1bpw", "--formats",
                             "int4:g64,int8", "--windows", "1", "--ctx", "64", "--verify", "--verify-windows",
                             "4", "--plot", str(chart))
    assert code == 0, err
    assert "Plans across budgets" in out and "uniform int4:g64" in out and "budget 7bpw" in out
    assert chart.read_text().lstrip().startswith("<?xml")
    code, _, err = run_cli(capsys, "plan", "tiny-llama", "--budget", "5bpw", "--plot", str(chart))
    assert code == 2 and "--plot draws a sweep" in err
