"""Layer names the user types (--keep, --select, convert --keep) that match nothing name the closest ones."""

from __future__ import annotations

import torch
from safetensors.torch import save_file

from helpers import run_cli


def test_a_keep_typo_fails_its_variant_with_the_closest_module_and_class(capsys):
    code, out, _ = run_cli(capsys, "compare", "dummy", "--to", "fp16", "--keep", "token_embeding",
                           "--columns", "all")
    assert code == 4 and "--keep 'token_embeding' matches no module" in out
    assert "(did you mean 'token_embedding'" in out
    code, out, _ = run_cli(capsys, "compare", "dummy", "--to", "fp16", "--keep", "LayerNrom",
                           "--columns", "all")
    assert code == 4 and "(did you mean 'LayerNorm'" in out  # a class name too


def test_a_select_typo_is_exit_2_with_the_closest_module(capsys):
    code, out, err = run_cli(capsys, "compare", "dummy", "--to", "fp16", "--layers", "--select", "linear_3")
    assert code == 2 and out == ""
    assert "no module matches --select 'linear_3' (did you mean 'linear_2', 'linear_1'?)" in err  # best first


def test_a_convert_keep_typo_names_the_closest_tensor_or_glob(capsys, tmp_path):
    save_file({"layers.0.norm.weight": torch.ones(4), "layers.0.proj.weight": torch.ones(4, 4)},
              tmp_path / "w.safetensors")
    for pattern, hint in [("layers.0.nrom", "'layers.0.norm'"), ("*nrom*", "'*norm*'")]:
        code, out, err = run_cli(capsys, "convert", tmp_path / "w.safetensors", "--to", "fp16",
                                 "-o", tmp_path / "o.safetensors", "--keep", pattern)
        assert code == 2 and f"(did you mean {hint}" in err, err
        assert not (tmp_path / "o.safetensors").exists()
