"""Tampered compressed-tensors configs (issue 18 item 4): the stored parts are checked against the
scheme the config names, so a tampered field is a one-line error, never codes read under another scheme."""

from __future__ import annotations

import json
import shutil

import pytest

from dtypelab.checkpoint import convert_checkpoint
from helpers import run_cli


@pytest.fixture(scope="module")
def int4_folder(tmp_path_factory, tiny_source):
    """tiny_source converted to int4 with groups of 8 (compressed-tensors pack-quantized)."""
    out = tmp_path_factory.mktemp("int4") / "q"
    convert_checkpoint(tiny_source, out, "int4:g8")
    return out


def tamper(folder, tmp_path, **weights):
    copy = shutil.copytree(folder, tmp_path / "tampered")
    config = json.loads((copy / "config.json").read_text())
    config["quantization_config"]["config_groups"]["group_0"]["weights"].update(weights)
    (copy / "config.json").write_text(json.dumps(config))
    return copy


def test_the_untampered_folder_loads(capsys, int4_folder):
    code, _, err = run_cli(capsys, "inspect", int4_folder)
    assert code == 0, err


@pytest.mark.parametrize("weights", [{"num_bits": 8}, {"group_size": 5}, {"group_size": 16},
                                     {"strategy": "tensor"}, {"strategy": "channel"}, {"symmetric": False},
                                     {"num_bits": "4"}])
def test_a_tampered_scheme_is_one_line_exit_2(capsys, tmp_path, int4_folder, weights):
    code, _, err = run_cli(capsys, "inspect", tamper(int4_folder, tmp_path, **weights))
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    assert "does not match the weights" in lines[0] or "not one dtypelab loads" in lines[0]
