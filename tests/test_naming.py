"""The closest names of a pattern that matched nothing: what a "did you mean" for layer names offers."""

from dtypelab.naming import closest_names, did_you_mean_names

NAMES = ["model.layers.0.input_layernorm", "model.layers.0.self_attn.q_proj", "model.norm", "lm_head"]


def test_a_mistyped_name_finds_the_name():
    assert closest_names("lm_haed", NAMES) == ["lm_head"]
    assert closest_names("model.layers.0.input_layernrom", NAMES)[0] == "model.layers.0.input_layernorm"


def test_a_mistyped_part_finds_the_first_name_holding_it_and_a_glob_stays_a_glob():
    assert closest_names("input_layernrom", NAMES) == ["model.layers.0.input_layernorm"]
    assert closest_names("*nrom*", NAMES) == ["*norm*"]  # a glob is answered with a glob that matches


def test_nothing_close_is_no_suggestion():
    assert closest_names("zzz", NAMES) == [] and closest_names("*", NAMES) == []
    assert did_you_mean_names("zzz", NAMES) == ""
    assert did_you_mean_names("lm_haed", NAMES) == " (did you mean 'lm_head'?)"
