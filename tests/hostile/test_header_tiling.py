"""Silently wrong values (issue 18 item 2): the tensors' byte ranges must tile the data section exactly,
so a header length off by a few bytes into its own padding, a gap, an overlap, trailing bytes or a
deleted entry is refused — exactly where safetensors.safe_open refuses, but for tied ranges (documented)."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from dtypelab.checkpoint import read_header
from dtypelab.errors import CheckpointError
from helpers import run_cli

A = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
B = {"dtype": "F32", "shape": [3], "data_offsets": [8, 20]}
DATA = torch.tensor([-1.125, -1.15, 0.5, 2.0, 3.0]).numpy().tobytes()


def write(path: Path, header: dict, data: bytes = DATA, padding: int = 8, delta: int = 0) -> Path:
    """A safetensors file with ``padding`` spaces after the JSON and its length field off by ``delta``."""
    raw = json.dumps(header).encode() + b" " * padding
    path.write_bytes(struct.pack("<Q", len(raw) + delta) + raw + data)
    return path


MUTANTS = {
    **{f"length {d:+d}": ({"a": A, "b": B}, DATA, d) for d in (-5, -4, -3, -2, -1, 1, 2, 3, 4, 5)},
    "gap": ({"a": A, "b": {**B, "data_offsets": [9, 21]}}, DATA + b"\0", 0),
    "overlap": ({"a": A, "b": {**B, "data_offsets": [4, 16]}}, DATA[:16], 0),
    "trailing bytes": ({"a": A, "b": B}, DATA + b"\0\0\0\0", 0),
    "deleted first entry": ({"b": B}, DATA, 0),
    "deleted last entry": ({"a": A}, DATA, 0),
    "offset past the end": ({"a": A, "b": {**B, "data_offsets": [8, 24], "shape": [4]}}, DATA, 0),
    "zero-size inside a tensor": ({"a": A, "b": B, "z": {**A, "shape": [0], "data_offsets": [4, 4]}},
                                  DATA, 0),
}


def refused_by_safetensors(path: Path) -> bool:
    try:
        with safe_open(str(path), framework="pt") as handle:
            for name in handle.keys():  # noqa: SIM118 - safe_open has no __iter__
                handle.get_tensor(name)
    except SafetensorError:
        return True
    return False


def refused_by_dtypelab(path: Path) -> bool:
    return dtypelab_refusal(path) is not None


def dtypelab_refusal(path: Path) -> str | None:
    try:
        read_header(path)
    except CheckpointError as exc:
        return str(exc)
    return None


DOCUMENTED = ("control characters",)
"""Where dtypelab refuses what safe_open accepts, on purpose (README, "What dtypelab will and will not
read or run")."""


@pytest.mark.parametrize("name", MUTANTS)
def test_mutant_is_refused_by_dtypelab_and_by_safe_open(tmp_path, name):
    header, data, delta = MUTANTS[name]
    path = write(tmp_path / "m.safetensors", header, data, delta=delta)
    assert refused_by_dtypelab(path)
    assert refused_by_safetensors(path)


def test_the_intact_file_is_read_by_both(tmp_path):
    path = write(tmp_path / "m.safetensors", {"a": A, "b": B})
    assert not refused_by_dtypelab(path) and not refused_by_safetensors(path)
    assert [e.name for e in read_header(path).tensors] == ["a", "b"]


def test_differential_over_every_offset_and_length(tmp_path):
    """Every begin/end of b and every length delta: dtypelab and safe_open agree, but on tied ranges."""
    disagreements = []
    for delta in range(-6, 7):
        for begin in range(0, 14, 2):
            for end in range(begin, 24, 4):
                shape = [(end - begin) // 4]
                header = {"a": A, "b": {"dtype": "F32", "shape": shape, "data_offsets": [begin, end]}}
                path = write(tmp_path / f"d{delta}-{begin}-{end}.safetensors", header, DATA, delta=delta)
                tied = (begin, end) == (0, 8)
                if refused_by_dtypelab(path) != refused_by_safetensors(path) and not tied:
                    disagreements.append((delta, begin, end))
    assert disagreements == []


def test_tied_ranges_are_the_documented_difference(tmp_path):
    path = write(tmp_path / "t.safetensors", {"a": A, "b": dict(A)}, DATA[:8])
    assert not refused_by_dtypelab(path) and refused_by_safetensors(path)


@pytest.mark.parametrize("name", ["length -3", "gap", "trailing bytes", "deleted first entry"])
def test_inspect_and_convert_exit_2_in_one_line_and_write_nothing(capsys, tmp_path, name):
    header, data, delta = MUTANTS[name]
    path = write(tmp_path / "m.safetensors", header, data, delta=delta)
    code, out, err = run_cli(capsys, "inspect", path)
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1 and "m.safetensors" in err
    code, out, err = run_cli(capsys, "convert", path, "--to", "bf16", "-o", tmp_path / "out.safetensors")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out.safetensors").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]


def test_differential_over_every_single_bit_flip_of_a_real_header(tmp_path):
    """Every bit of the length field and of the header of a real save_file output, flipped one at a
    time: dtypelab refuses exactly the mutants safe_open refuses, but for the documented
    differences (a control character in a tensor name)."""
    save_file({"model.embed.weight": torch.randn(4, 3), "model.norm.weight": torch.ones(3).half(),
               "ids": torch.arange(3)}, tmp_path / "real.safetensors", metadata={"format": "pt"})
    original = (tmp_path / "real.safetensors").read_bytes()
    header_end = 8 + int.from_bytes(original[:8], "little")
    bits = range(header_end * 8)
    disagreements = []
    for bit in bits:
        mutant = bytearray(original)
        mutant[bit // 8] ^= 1 << (bit % 8)
        path = tmp_path / "m.safetensors"
        path.write_bytes(bytes(mutant))
        refusal = dtypelab_refusal(path)
        documented = refusal is not None and any(reason in refusal for reason in DOCUMENTED)
        if (refusal is not None) != refused_by_safetensors(path) and not documented:
            disagreements.append((bit, bytes(mutant[max(8, bit // 8 - 10):bit // 8 + 10])))
    assert disagreements == []
