"""The hand-written safetensors reader/writer, checked against the safetensors package itself."""

from __future__ import annotations

import json
import struct
import time
import tracemalloc
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from dtypelab.checkpoint import read_header, safetensors_file
from dtypelab.checkpoint.safetensors_file import DTYPES, encode_header
from dtypelab.errors import CheckpointError


def raw_file(path: Path, header: dict | bytes, data: bytes = b"", length: int | None = None) -> Path:
    """Write a safetensors file byte by byte, so tests can build damaged ones."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw) if length is None else length) + raw + data)
    return path


def test_header_matches_safetensors_own_reading(tmp_path):
    tensors = {"w": torch.randn(3, 4), "ids": torch.arange(5), "mask": torch.tensor([True, False]),
               "h": torch.randn(2, 2).half(), "b": torch.randn(7).bfloat16(), "d": torch.randn(1).double()}
    path = tmp_path / "m.safetensors"
    save_file(tensors, path, metadata={"format": "pt"})
    header = read_header(path)
    assert header.metadata == {"format": "pt"}
    with safe_open(path, "pt") as reference:
        assert {e.name for e in header.tensors} == set(reference.keys())
        for entry in header.tensors:
            assert entry.torch_dtype == tensors[entry.name].dtype
            assert list(entry.shape) == reference.get_slice(entry.name).get_shape()
    data = path.read_bytes()
    for entry in header.tensors:  # the offsets find the very bytes safetensors wrote
        chunk = data[header.data_start + entry.begin:header.data_start + entry.end]
        assert chunk == tensors[entry.name].contiguous().view(torch.uint8).numpy().tobytes()


def test_encoded_header_is_read_by_safetensors(tmp_path):
    a, b = torch.randn(2, 3), torch.arange(4, dtype=torch.int32)
    blob = a.numpy().tobytes() + b.numpy().tobytes()
    entries = [("a", "F32", (2, 3), 0, 24), ("b", "I32", (4,), 24, 40)]
    path = tmp_path / "x.safetensors"
    path.write_bytes(encode_header(entries, {"k": "v"}) + blob)
    assert (8 + int.from_bytes(path.read_bytes()[:8], "little")) % 8 == 0  # data section aligned
    loaded = load_file(path)
    assert torch.equal(loaded["a"], a) and torch.equal(loaded["b"], b)


def test_tied_tensors_share_a_range(tmp_path):
    header = {"emb": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]},
              "lm_head": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}}
    parsed = read_header(raw_file(tmp_path / "t.safetensors", header, bytes(16)))
    assert parsed.shared_groups() == [("emb", "lm_head")]


def test_every_safetensors_dtype_code_maps_to_matching_itemsize():
    expected_bits = {"BOOL": 8, "U8": 8, "I8": 8, "I16": 16, "U16": 16, "F16": 16, "BF16": 16, "I32": 32,
                     "U32": 32, "F32": 32, "I64": 64, "U64": 64, "F64": 64, "F8_E4M3": 8, "F8_E5M2": 8,
                     "F8_E8M0": 8, "C64": 64}
    for code, dtype in DTYPES.items():
        assert dtype.itemsize * 8 == expected_bits[code], code


F32_4 = {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}

BAD_FILES = {
    "truncated": (b"\x01\x02", None, b"", "truncated"),
    "length_beyond_file": ({"w": F32_4}, 500, bytes(16), "runs past the end"),
    "huge_header": (b"{}", 300_000_000, b"", "exceeds the"),
    "not_json": (b"{not json", None, b"", "not valid JSON"),
    "not_utf8": (b"\xff\xfe", None, b"", "not valid JSON"),
    "json_list": (b"[1, 2]", None, b"", "not an object"),
    "duplicate_name": (b'{"w": {}, "w": {}}', None, b"", "duplicate key"),
    "unknown_dtype": ({"w": {**F32_4, "dtype": "F33"}}, None, bytes(16), "unknown dtype 'F33'"),
    "negative_shape": ({"w": {**F32_4, "shape": [-4]}}, None, bytes(16), "non-negative integers"),
    "size_mismatch": ({"w": {**F32_4, "shape": [5]}}, None, bytes(16), "needs 20"),
    "out_of_range": ({"w": {**F32_4, "data_offsets": [16, 32]}}, None, bytes(16), "truncated"),
    "overlap": ({"w": F32_4, "v": {**F32_4, "shape": [2], "data_offsets": [8, 16]}}, None, bytes(16),
                "overlaps"),
    "tied_other_dtype": ({"w": F32_4, "v": {**F32_4, "dtype": "I32"}}, None, bytes(16), "another dtype"),
    "control_char_name": ({"w\x1b[2J": F32_4}, None, bytes(16), "control characters"),
    "extra_field": ({"w": {**F32_4, "exec": "rm"}}, None, bytes(16), "exactly dtype"),
    "bad_metadata": ({"__metadata__": {"a": 1}}, None, b"", "__metadata__"),
}


@pytest.mark.parametrize("case", BAD_FILES, ids=list(BAD_FILES))
def test_bad_file_is_one_clear_error(tmp_path, case):
    header, length, data, message = BAD_FILES[case]
    path = tmp_path / f"{case}.safetensors"
    if case == "truncated":
        path.write_bytes(header)
    else:
        raw_file(path, header, data, length)
    with pytest.raises(CheckpointError, match=message) as caught:
        read_header(path)
    text = str(caught.value)
    assert str(path) in text and "\n" not in text and "\x1b" not in text
    if isinstance(header, dict) and header.keys() - {"__metadata__"} and case != "length_beyond_file":
        assert "tensor" in text  # names the tensor too


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="cannot open"):
        read_header(tmp_path / "nope.safetensors")


@pytest.mark.parametrize("step", [1, 5, 13, 14, 15, 40, 1 << 20])
def test_tensors_are_counted_as_the_header_is_read_across_every_step_boundary(tmp_path, monkeypatch, step):
    """The header is read ``READ_STEP_BYTES`` at a time and its "data_offsets" keys counted as it comes:
    a key split across two reads counts once, so the limit holds exactly whatever the step."""
    monkeypatch.setattr(safetensors_file, "READ_STEP_BYTES", step)
    monkeypatch.setattr(safetensors_file, "MAX_TENSORS", 5)
    for count, refused in ((5, False), (6, True)):
        header = {f"t{i}": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]} for i in range(count)}
        raw = json.dumps(header).encode()
        path = tmp_path / f"m{count}.safetensors"
        path.write_bytes(struct.pack("<Q", len(raw)) + raw)
        if refused:
            with pytest.raises(CheckpointError, match="6 tensors, more than the 5 limit"):
                read_header(path)
        else:
            assert len(read_header(path).tensors) == 5


def test_a_header_past_the_tensor_limit_is_refused_before_the_rest_is_read(tmp_path, monkeypatch):
    """Past the limit in the first read, the rest (20 MB, not even JSON) is never read: the reader's peak
    allocation stays near one read step, not the header's length."""
    monkeypatch.setattr(safetensors_file, "READ_STEP_BYTES", 4096)
    monkeypatch.setattr(safetensors_file, "MAX_TENSORS", 10)
    entries = ",".join(f'"t{i}":{{"dtype":"F32","shape":[0],"data_offsets":[0,0]}}' for i in range(100))
    raw = ("{" + entries).encode() + b"\xff" * 20_000_000
    path = tmp_path / "m.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw)
    tracemalloc.start()
    try:
        with pytest.raises(CheckpointError, match="more than the 10 limit"):
            read_header(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1_000_000  # a few read steps and the error, against the 20 MB a full read takes


def test_a_shape_of_huge_dimensions_is_refused_before_its_product_is_taken(tmp_path):
    """100,000 dimensions of 2^64 - 1 (2 MB of JSON): their exact product has 6.4 M bits, 40 s of
    big-integer arithmetic here (the reader took it before the size was checked); the size check now
    stops at the second dimension, as safetensors' checked multiplication does."""
    shape = ",".join(["18446744073709551615"] * 100_000)
    raw = ('{"a":{"dtype":"U8","shape":[' + shape + '],"data_offsets":[0,0]}}').encode()
    path = tmp_path / "m.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw)
    start = time.perf_counter()
    with pytest.raises(CheckpointError, match="overflows 64 bits"):
        read_header(path)
    assert time.perf_counter() - start < 5.0  # 0.05 s here
