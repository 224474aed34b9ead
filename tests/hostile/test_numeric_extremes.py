"""Numeric extremes and odd layouts through convert (issue 18 item 6): an inf that fp8 e4m3 saturates to
448 is a lost value that ``--strict`` refuses, the report's SQNR of weights past float32's squares is
finite, and a tied alias of another shape keeps its shape."""

from __future__ import annotations

import json
import math
import struct

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from helpers import run_cli


def test_strict_refuses_an_inf_saturated_to_448(capsys, tmp_path):
    source = tmp_path / "w.safetensors"
    save_file({"w": torch.tensor([math.inf, 1.0, -0.5, 2.0])}, source)
    out = tmp_path / "out.safetensors"
    code, _, err = run_cli(capsys, "convert", source, "--to", "fp8_e4m3:cast", "-o", out, "--strict",
                           "--report", tmp_path / "r.json")
    assert code == 3 and "1 values overflow" in err and not out.exists()
    assert json.loads((tmp_path / "r.json").read_text())["tensors"][0]["overflowed"] == 1


def test_fp16_keeps_an_inf_as_inf_and_strict_passes(capsys, tmp_path):
    source = tmp_path / "w.safetensors"
    save_file({"w": torch.tensor([math.inf, 1.0, -0.5, 2.0])}, source)
    code, _, err = run_cli(capsys, "convert", source, "--to", "fp16", "-o", tmp_path / "out.safetensors",
                           "--strict")
    assert code == 0, err


def test_report_sqnr_of_huge_weights_is_finite(capsys, tmp_path, tiny_folder):
    """A tiny llama's weights times 1e20, quantized to int8: each layer's SQNR in the report is taken in
    float64 (finite, the ~40 dB of int8 per channel on Gaussian weights), not inf or NaN from float32
    squares past 3.4e38."""
    weights = tiny_folder / "model.safetensors"
    tensors = {name: tensor * 1e20 for name, tensor in load_file(weights).items()}
    save_file(tensors, weights, metadata={"format": "pt"})
    report = tmp_path / "r.json"
    code, _, err = run_cli(capsys, "convert", tiny_folder, "--to", "int8", "-o", tmp_path / "out",
                           "--report", report)
    assert code == 0, err
    sqnr = [t["sqnr_db"] for t in json.loads(report.read_text())["tensors"] if t["action"] == "quantized"]
    assert sqnr and all(isinstance(v, float) and 30 < v < 60 for v in sqnr), sqnr


def test_a_tied_alias_of_another_shape_keeps_its_shape(capsys, tmp_path):
    """"a" [2, 3] and "b" [6] over the same bytes (a view; safe_open refuses such a file, dtypelab reads
    it as tied): "b" is written as a tensor of its own in its shape, not as a name-only alias of "a"."""
    header = {"a": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]},
              "b": {"dtype": "F32", "shape": [6], "data_offsets": [0, 24]},
              "c": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]}}
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    values = torch.arange(6, dtype=torch.float32)
    source = tmp_path / "view.safetensors"
    source.write_bytes(struct.pack("<Q", len(raw)) + raw + values.numpy().tobytes())
    out = tmp_path / "out.safetensors"
    code, _, err = run_cli(capsys, "convert", source, "--to", "bf16", "-o", out)
    assert code == 0, err
    with safe_open(str(out), framework="pt") as handle:
        assert sorted(handle.keys()) == ["a", "b"]
        assert json.loads(handle.metadata()["tied_aliases"]) == {"c": "a"}  # same shape: still tied
        assert handle.get_tensor("a").shape == (2, 3) and handle.get_tensor("b").shape == (6,)
        assert torch.equal(handle.get_tensor("b").float(), values)
