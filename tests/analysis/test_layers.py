"""Layer-wise comparison: every row against an independent whole-activation capture, both modes,
the damaged layer named, bounded lock-step execution and clean failure on mismatched models."""

import math
import threading

import pytest
import torch
from torch import nn

from dtypelab import DummyModel, cast_model
from dtypelab.analysis import compare_layers, output_metrics, run_model, select_layers, select_output
from dtypelab.analysis import layers as layers_module
from dtypelab.errors import InputError
from dtypelab.formats import get_format
from helpers import run_cli
from layer_models import OverflowModel, llama_input, minilm, minilm_input, overflow_input, tiny_llama

# Row metrics are float64 sums; compare.py takes |diff| in float32, so the abs-diff metrics agree to
# float32 rounding (2^-24 relative) and the float64 ones (rel error, SQNR, cosine) to summation order.
REL = 1e-6


def capture_all(model: nn.Module, inputs, names: list[str]) -> dict[str, torch.Tensor]:
    """The naive way: keep every selected module's output (first call) — the independent truth."""
    outputs: dict[str, torch.Tensor] = {}

    def keeper(name):
        def hook(module, args, output):
            outputs.setdefault(name, select_output(output).clone())  # returns None: output unchanged
        return hook

    handles = [model.get_submodule(n).register_forward_hook(keeper(n)) for n in names]
    with torch.inference_mode():
        run_model(model, inputs)
    for h in handles:
        h.remove()
    return outputs


def assert_metrics_close(row_metrics, truth):
    for field in ("mean_abs_diff", "max_abs_diff", "relative_error", "sqnr_db", "cosine_similarity"):
        assert getattr(row_metrics, field) == pytest.approx(getattr(truth, field), rel=REL, abs=1e-12), field
    assert (row_metrics.nan_count, row_metrics.inf_count) == (truth.nan_count, truth.inf_count)


def test_select_layers_by_depth_and_glob():
    model = tiny_llama()
    assert select_layers(model, depth=1) == ["model", "lm_head"]
    assert select_layers(model, patterns=["*.mlp"]) == ["model.layers.0.mlp", "model.layers.1.mlp"]
    assert "model.layers.0.mlp.down_proj" in select_layers(model)
    with pytest.raises(InputError, match="no module matches"):
        select_layers(model, patterns=["nothing*"])
    with pytest.raises(InputError, match="--depth 0"):
        select_layers(model, depth=0)


@pytest.mark.parametrize("fmt", ["fp16", "bf16"])
def test_propagated_rows_equal_a_full_capture_on_tiny_llama(fmt):
    model, ids = tiny_llama(), llama_input()
    variant = cast_model(model, fmt)
    result = compare_layers(model, {fmt: variant}, ids)
    names = [r.name for r in result.variants[0].rows]
    ref_out, var_out = capture_all(model, ids, names), capture_all(variant, ids, names)
    assert len(names) == len(set(names)) and set(names) == set(ref_out)
    for row in result.variants[0].rows:
        assert_metrics_close(row.metrics, output_metrics(ref_out[row.name], var_out[row.name]))
        assert row.reference_absmax == ref_out[row.name].abs().max().item()


def test_rows_are_in_execution_order_children_before_their_block():
    result = compare_layers(tiny_llama(), {"bf16": cast_model(tiny_llama(), "bf16")}, llama_input())
    names = [r.name for r in result.variants[0].rows]
    assert names[0] == "model.embed_tokens" and names[-1] == "lm_head"
    assert names.index("model.layers.0.mlp.down_proj") < names.index("model.layers.0.mlp") \
        < names.index("model.layers.0") < names.index("model.layers.1.input_layernorm")


def test_isolated_row_is_the_variant_layer_on_the_reference_input():
    model, ids = tiny_llama(), llama_input()
    variant = cast_model(model, "fp16")
    name = "model.layers.1.mlp.down_proj"
    inputs = {}
    handle = model.get_submodule(name).register_forward_hook(
        lambda m, a, o: inputs.update(x=a[0].clone(), y=o))
    with torch.inference_mode():
        run_model(model, ids)
        handle.remove()
        expected = output_metrics(inputs["y"], variant.get_submodule(name)(inputs["x"].half()))
    row = next(r for r in compare_layers(model, {"fp16": variant}, ids, mode="isolated", patterns=[name])
               .variants[0].rows)
    assert row.name == name and row.input_relative_error == 0.0
    assert_metrics_close(row.metrics, expected)


@pytest.mark.parametrize("mode", ["propagated", "isolated"])
def test_the_damaged_layer_is_named_first_in_both_modes(mode):
    model, ids = tiny_llama(), llama_input()
    variant = cast_model(model, "fp16")
    damaged = "model.layers.1.mlp.down_proj"
    weight = variant.get_submodule(damaged).weight
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        weight.add_(torch.randn_like(weight) * weight.std())  # noise as strong as the weight: ~0 dB
    result = compare_layers(model, {"fp16": variant}, ids, mode=mode)
    rows = result.variants[0].rows
    assert result.variants[0].first_crossing == damaged
    crossing = {r.name for r in rows if r.crosses(result.threshold_db)}
    if mode == "isolated":  # the layer and its MLP; the blocks holding it at most (their residual dilutes it)
        holders = {damaged, "model.layers.1.mlp", "model.layers.1", "model"}
        assert {damaged, "model.layers.1.mlp"} <= crossing <= holders
    before = rows[:[r.name for r in rows].index(damaged)]
    assert before and all(not r.crosses(result.threshold_db) for r in before)
    assert result.variants[0].verdict in ("degraded", "broken")


def test_added_error_in_propagated_mode_is_output_minus_input_error():
    result = compare_layers(tiny_llama(), {"bf16": cast_model(tiny_llama(), "bf16")}, llama_input(),
                            patterns=["*.post_attention_layernorm", "*.mlp"])
    rows = {r.name: r for r in result.variants[0].rows}
    norm, mlp = rows["model.layers.0.post_attention_layernorm"], rows["model.layers.0.mlp"]
    assert mlp.input_relative_error == pytest.approx(norm.metrics.relative_error, rel=1e-9)  # mlp eats norm
    assert mlp.added_relative_error == pytest.approx(mlp.metrics.relative_error - norm.metrics.relative_error)


def test_dummy_table_and_verdicts():
    model = DummyModel()
    ids = torch.tensor([[1, 0, 1]])
    variants = {"fp16": cast_model(model, "fp16"), "fp32": cast_model(model, "fp32")}
    result = compare_layers(model, variants, ids)
    names = [r.name for r in result.variants[0].rows]
    assert names == ["token_embedding", "linear_1", "layernorm_1", "linear_2", "layernorm_2", "head"]
    exact = result.variants[1]
    assert all(r.metrics.sqnr_db == math.inf for r in exact.rows) and exact.verdict == "within format noise"
    assert exact.noise_floor_db == math.inf  # rounding to fp32 changes nothing
    text = result.to_text()
    assert "layernorm_2" in text and "fp16: no layer below 20 dB" in text


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["propagated", "isolated"])
def test_minilm_every_module(mode):
    model, inputs = minilm(), minilm_input()
    variant = cast_model(model, "fp16")
    result = compare_layers(model, {"fp16": variant}, inputs, mode=mode)
    rows = result.variants[0].rows
    names = [r.name for r in rows]
    assert "encoder.layer.5.output.dense" in names and names[-1] == "pooler"
    truth_names = ["embeddings", "encoder.layer.0.attention.self.query", "encoder.layer.5.output"]
    ref_out, var_out = capture_all(model, inputs, truth_names), capture_all(variant, inputs, truth_names)
    by_name = {r.name: r for r in rows}
    if mode == "propagated":
        for name in truth_names:
            assert_metrics_close(by_name[name].metrics, output_metrics(ref_out[name], var_out[name]))
    assert result.variants[0].first_crossing is None  # fp16 keeps all-MiniLM far above 20 dB
    assert result.variants[0].verdict == "within format noise"


def test_overflow_shows_as_non_finite_rows_and_broken_verdict():
    model = OverflowModel()
    result = compare_layers(model, {"fp16": cast_model(model, "fp16")}, overflow_input())
    variant = result.variants[0]
    first_bad = next(r for r in variant.rows if r.metrics.inf_count or r.metrics.nan_count)
    assert first_bad.name == "blocks.1.wo" and variant.first_crossing == "blocks.1.wo"
    assert variant.verdict == "broken"


class SkipsALayer(DummyModel):
    def forward(self, input_ids):
        return self.head(self.layernorm_1(self.linear_1(self.token_embedding(input_ids))))


class Raises(DummyModel):
    def forward(self, input_ids):
        self.token_embedding(input_ids)
        raise RuntimeError("variant failed")


@pytest.mark.parametrize("mode", ["propagated", "isolated"])
def test_mismatched_or_failing_variant_raises_and_leaves_no_thread(mode):
    before = threading.active_count()
    ids = torch.tensor([[1, 0, 1]])
    with pytest.raises(InputError, match="module calls differ"):
        compare_layers(DummyModel(), {"x": SkipsALayer()}, ids, mode=mode)
    with pytest.raises(RuntimeError, match="variant failed"):
        compare_layers(DummyModel(), {"x": Raises()}, ids, mode=mode)
    assert threading.active_count() == before


def test_reference_failure_reaches_the_caller():
    with pytest.raises(IndexError):
        compare_layers(DummyModel(), {"fp16": cast_model(DummyModel(), "fp16")}, torch.tensor([[5]]))


def test_unknown_mode_is_refused():
    with pytest.raises(InputError, match="unknown mode"):
        compare_layers(DummyModel(), {}, torch.tensor([[1]]), mode="sideways")


def test_hooks_are_removed_and_reference_unchanged():
    model = DummyModel()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    compare_layers(model, {"bf16": cast_model(model, "bf16")}, torch.tensor([[1, 0, 1]]), mode="isolated")
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_lockstep_holds_at_most_one_reference_layer_ahead(monkeypatch):
    """The reference thread blocks in each hook until the variant consumed it: count pending items."""
    peaks = []
    original = layers_module._LockStep._receive

    def receive(self):
        item = original(self)
        peaks.append(self.handoff.qsize())  # anything still queued was produced ahead of the variant
        return item

    monkeypatch.setattr(layers_module._LockStep, "_receive", receive)
    compare_layers(tiny_llama(), {"bf16": cast_model(tiny_llama(), "bf16")}, llama_input())
    assert peaks and max(peaks) == 0


# ---- CLI: dtypelab compare MODEL --layers ----

cli = run_cli


def test_cli_layers_json_matches_the_library(capsys):
    import json

    code, out, _ = cli(capsys, "compare", "dummy", "--to", "bf16", "--layers", "--mode", "isolated",
                       "--select", "linear_*", "--threshold", "50", "--json")
    assert code == 0
    data = json.loads(out)
    model = DummyModel()
    truth = compare_layers(model, {"bf16": cast_model(model, "bf16")}, torch.tensor([[1, 0, 1]]),
                           mode="isolated", patterns=["linear_*"], threshold_db=50)
    variant = data["variants"][0]
    assert [r["name"] for r in variant["rows"]] == ["linear_1", "linear_2"]
    assert variant["rows"][1]["metrics"]["sqnr_db"] == truth.variants[0].rows[1].metrics.sqnr_db
    assert data["mode"] == "isolated" and variant["verdict"] == truth.variants[0].verdict


def test_cli_layers_text_and_plot(capsys, tmp_path):
    pytest.importorskip("matplotlib")
    plot = tmp_path / "dummy.svg"
    code, out, _ = cli(capsys, "compare", "dummy", "--layers", "--depth", "1", "--plot", str(plot))
    assert code == 0 and "Layer-wise comparison (propagated" in out and "bf16: no layer below" in out
    assert "layernorm_1" in plot.read_text()


@pytest.mark.parametrize(("argv", "message"), [
    (["compare", "dummy", "--plot", "x.png"], "--plot needs --layers"),
    (["compare", "dummy", "--layers", "--depth", "0"], "--depth 0 selects nothing"),
    (["compare", "dummy", "--layers", "--select", "nope*"], "no module matches"),
    (["compare", "dummy", "--layers", "--plot", "x.pdf"], ".png or .svg"),
])
def test_cli_layers_bad_input_is_one_line(capsys, argv, message):
    code, out, err = cli(capsys, *argv)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1


class PassesIds(DummyModel):
    """DummyModel with a module whose output is the integer ids: nothing to compare there."""

    def __init__(self):
        super().__init__()
        self.ids = nn.Identity()

    def forward(self, input_ids):
        return super().forward(self.ids(input_ids))


def test_layers_without_floating_output_are_listed_not_dropped():
    from dtypelab.analysis import predict_headroom

    model = PassesIds()
    result = compare_layers(model, {"bf16": cast_model(model, "bf16")}, torch.tensor([[1, 0, 1]]))
    assert result.variants[0].not_compared == ["ids"]
    assert "ids" not in [r.name for r in result.variants[0].rows]
    assert "not compared (no floating output): ids" in result.to_text()
    report = predict_headroom(model, torch.tensor([[1, 0, 1]]), ["fp16"])
    assert report.not_measured == ["ids"] and "not measured (no floating output): ids" in report.to_text()


@pytest.mark.parametrize("mode", ["propagated", "isolated"])
def test_tiny_gpt2_blocks(mode):
    from layer_models import tiny_gpt2

    model = tiny_gpt2()
    result = compare_layers(model, {"fp16": cast_model(model, "fp16")}, torch.arange(10).unsqueeze(0),
                            mode=mode, patterns=["transformer.h.*", "lm_head"])
    names = [r.name for r in result.variants[0].rows]
    assert names[-1] == "lm_head" and {"transformer.h.0", "transformer.h.1.mlp.c_fc"} <= set(names)
    assert result.variants[0].first_crossing is None and result.variants[0].final.top1_agreement == 1.0


@pytest.mark.slow
def test_padding_is_left_out_as_compare_models_does():
    from dtypelab.analysis import compare_models, valid_positions
    from dtypelab.models import load, model_inputs

    loaded = load("minilm", "fp32")
    inputs = model_inputs(loaded, texts=["A short one.", "A much longer sentence, with more tokens in it."])
    assert not bool(inputs["attention_mask"].all())  # the first row is padded
    variant = cast_model(loaded.model, "fp16")
    result = compare_layers(loaded.model, {"fp16": variant}, inputs, patterns=["encoder.layer.5"])
    truth = compare_models(loaded.model, {"fp16": variant}, inputs).variants[0].metrics
    assert_metrics_close(result.variants[0].final, truth)
    mask, name = inputs["attention_mask"], "encoder.layer.5"
    ref_out, var_out = capture_all(loaded.model, inputs, [name]), capture_all(variant, inputs, [name])
    row = result.variants[0].rows[0]
    assert row.shape == tuple(ref_out[name].shape)  # the full (batch, seq, hidden) shape is reported
    assert_metrics_close(row.metrics, output_metrics(valid_positions(ref_out[name], mask),
                                                     valid_positions(var_out[name], mask)))


def test_noise_floor_can_be_skipped():
    model = DummyModel()
    result = compare_layers(model, {"bf16": cast_model(model, "bf16")}, torch.tensor([[1, 0, 1]]),
                            noise_floor=False)
    assert result.variants[0].noise_floor_db is None and result.variants[0].verdict == "unknown"
    assert result.variants[0].rows[0].floor_db is not None  # per-layer floors are still there
    assert "rounding alone unknown (noise_floor=False) -> unknown" in result.to_text()


def test_a_variant_named_after_no_format_says_why_its_floor_is_unknown():
    model = DummyModel()
    result = compare_layers(model, {"mine": cast_model(model, "bf16")}, torch.tensor([[1, 0, 1]]))
    assert result.variants[0].noise_floor_db is None and result.variants[0].rows[0].floor_db is None
    assert "rounding alone unknown ('mine' names no format) -> unknown" in result.to_text()
    named = compare_layers(model, {"mine": cast_model(model, "bf16")}, torch.tensor([[1, 0, 1]]),
                           formats={"mine": get_format("bf16")})
    assert named.variants[0].format_name == "bf16" and named.variants[0].verdict == "within format noise"


def test_a_variant_sharing_modules_with_the_reference_is_refused():
    model = DummyModel()
    with pytest.raises(InputError, match="shares modules with the reference"):
        compare_layers(model, {"same": model}, torch.tensor([[1, 0, 1]]))


class Double(nn.Module):
    """Writes its result into its input, as ``x.mul_(2)`` does (not idempotent, unlike ReLU)."""

    def forward(self, x):
        return x.mul_(2)


class InPlace(nn.Module):
    """Modules that overwrite their input: in-place ReLU, ``doubler``, a child ``Double`` overwriting
    ``block.1``'s input, and one overwriting its container's own input (``outer``)."""

    def __init__(self):
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(3)
            self.embed, self.lin = nn.Embedding(10, 8), nn.Linear(8, 8)
            self.act, self.doubler = nn.ReLU(inplace=True), Double()
            self.block = nn.Sequential(nn.Linear(8, 8), Double(), nn.Linear(8, 8))
            self.outer = nn.Sequential(Double(), nn.Linear(8, 10))

    def forward(self, input_ids):
        return self.outer(self.block(self.doubler(self.act(self.lin(self.embed(input_ids))))))


IN_PLACE_IDS = torch.tensor([[1, 2, 3, 4]])


def test_isolated_mode_feeds_inputs_as_they_were_before_an_in_place_module_wrote_them():
    """An exact copy fed the reference's inputs must reproduce every layer: before the fix, ``doubler``
    was re-run on its already doubled input (SQNR 0 dB) and ``outer`` on an input doubled once more."""
    model = InPlace()
    result = compare_layers(model, {"fp32": cast_model(model, "fp32")}, IN_PLACE_IDS, mode="isolated")
    rows = {r.name: r.metrics.sqnr_db for r in result.variants[0].rows}
    assert rows == dict.fromkeys(["embed", "lin", "act", "doubler", "block.0", "block.1", "block.2", "block",
                                  "outer.0", "outer.1", "outer"], math.inf)
    assert not result.variants[0].input_changed_in_place  # restored, so nothing to report


def test_isolated_in_place_row_against_a_hand_computed_input():
    model = InPlace()
    result = compare_layers(model, {"bf16": cast_model(model, "bf16")}, IN_PLACE_IDS, mode="isolated",
                            patterns=["doubler"])
    with torch.no_grad():
        x = torch.relu(model.lin(model.embed(IN_PLACE_IDS)))  # what `doubler` receives, (1, 4, 8)
        expected = output_metrics(x * 2, x.bfloat16() * 2)  # the variant layer on it, in bf16
    assert_metrics_close(result.variants[0].rows[0].metrics, expected)


def test_propagated_mode_reports_inputs_changed_in_place():
    model = InPlace()
    result = compare_layers(model, {"bf16": cast_model(model, "bf16")}, IN_PLACE_IDS)
    variant = result.variants[0]
    assert variant.input_changed_in_place == ["act", "doubler", "block.1", "outer.0", "outer"]
    rows = {r.name: r for r in variant.rows}
    assert rows["act"].input_relative_error is None and math.isnan(rows["act"].added_relative_error)
    assert rows["block.2"].input_relative_error is not None  # its input, block.1's output, is intact
    names = [r.name for r in variant.rows]
    ref_out = capture_all(model, IN_PLACE_IDS, names)
    var_out = capture_all(cast_model(model, "bf16"), IN_PLACE_IDS, names)
    for row in variant.rows:  # the outputs themselves are measured before anything overwrites them
        assert_metrics_close(row.metrics, output_metrics(ref_out[row.name], var_out[row.name]))
    note = "input changed in place, added error unknown: act, doubler, block.1, outer.0, outer"
    assert note in result.to_text()


def test_isolated_mode_feeds_the_reference_values_inside_namedtuples():
    from collections import namedtuple

    from dtypelab.analysis.layers import _feed_like

    Pair = namedtuple("Pair", "hidden ids")
    reference, variant = Pair(torch.tensor([1e6, 0.1]), torch.tensor([1])), Pair(torch.zeros(2).half(),
                                                                                  torch.tensor([2]))
    fed = _feed_like(reference, variant)
    assert type(fed) is Pair and fed.ids is variant.ids  # non-floating values stay the variant's
    # the reference's floats in the variant's dtype, saturating at fp16's largest finite value
    assert fed.hidden.dtype == torch.float16
    assert fed.hidden.tolist() == [65504.0, torch.tensor(0.1).half().item()]


class DoublesItsInput(nn.Module):
    """Writes into the caller's float input tensor first thing, then a Linear."""

    def __init__(self):
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(4)
            self.doubler, self.lin = Double(), nn.Linear(4, 3)

    def forward(self, x):
        return self.lin(self.doubler(x))


@pytest.mark.parametrize("mode", ["propagated", "isolated"])
def test_a_model_writing_into_its_input_leaves_the_callers_tensor_and_the_other_model_alone(mode):
    """Both models used to read the caller's tensor while one of them doubled it in place (a race)."""
    model, x = DoublesItsInput(), torch.arange(8.0).reshape(2, 4)
    before = x.clone()
    result = compare_layers(model, {"fp32": cast_model(model, "fp32")}, x, mode=mode)
    assert torch.equal(x, before)
    assert result.variants[0].final.sqnr_db == math.inf  # an exact copy on the same input
    assert all(r.metrics.sqnr_db == math.inf for r in result.variants[0].rows)


def test_nan_threshold_is_refused():
    from dtypelab.analysis import compare_layers
    from dtypelab.errors import InputError
    from dtypelab.models import DummyModel

    model = DummyModel()
    with pytest.raises(InputError, match="threshold nan"):
        compare_layers(model, {"same": model}, torch.tensor([[1, 0, 1]]), threshold_db=float("nan"))
