"""Fuzzing safetensors headers (issue 18 item 7): generated headers, then mutated, go through dtypelab's
reader and ``safetensors.safe_open``; they must refuse the same files, but for the documented
differences (README, "What dtypelab will and will not read or run"), and where both read a file they must
read the same dtypes, shapes and bytes. dtypelab's reader may only ever raise CheckpointError."""

from __future__ import annotations

import json
import struct
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from hostile_helpers import fuzz
from hypothesis import given
from hypothesis import strategies as st
from safetensors import SafetensorError, safe_open

from dtypelab.checkpoint import read_header
from dtypelab.checkpoint.safetensors_file import DTYPES, SafetensorsHeader
from dtypelab.errors import CheckpointError

SAFETENSORS_DTYPES = ["BOOL", "U8", "I8", "I16", "U16", "I32", "U32", "I64", "U64", "F16", "BF16", "F32",
                      "F64", "F8_E4M3", "F8_E5M2", "F8_E8M0", "C64", "F4", "F6_E2M3", "F6_E3M2"]
"""Every dtype code safetensors 0.8 knows (F4 and F6 are sub-byte: sizes in bits)."""
BOGUS_DTYPES = ["f32", "F128", "", "Q4_0", 32, None, ["F32"]]
_ITEM_BITS = {"F4": 4, "F6_E2M3": 6, "F6_E3M2": 6, "BOOL": 8}

DOCUMENTED_REFUSALS = {
    "control characters": "names with control characters (safe_open accepts them)",
    "unknown dtype 'F4'": "F4 (torch has no 4-bit float dtype to read it into)",
    "entry must hold exactly": "entry keys beyond dtype, shape and data_offsets",
    "duplicate key": "a tensor name given twice (safe_open keeps the last; which one is meant is unknowable)",
}
"""Refusal reasons where dtypelab is stricter than safe_open, on purpose; a key is a substring of the
one-line error."""


def tensor_bytes(dtype: str, shape: list[int]) -> int:
    numel = 1
    for dim in shape:
        numel *= dim
    bits = _ITEM_BITS.get(dtype, 8 * DTYPES[dtype].itemsize if dtype in DTYPES else 8)
    return numel * bits // 8


@dataclass
class Verdict:
    """What one reader made of a file: ``refusal`` (the error, one line) or the tensors it read."""

    refusal: str | None
    tensors: dict[str, tuple[str, tuple[int, ...], bytes]]


def dtypelab_verdict(path: Path) -> Verdict:
    start = time.perf_counter()
    try:
        header = read_header(path)
    except CheckpointError as exc:
        assert len(str(exc).splitlines()) == 1, str(exc)
        return Verdict(str(exc), {})
    finally:
        assert time.perf_counter() - start < 5.0, "a small header took seconds"
    return Verdict(None, read_tensors(path, header))


def read_tensors(path: Path, header: SafetensorsHeader) -> dict[str, tuple[str, tuple[int, ...], bytes]]:
    raw = path.read_bytes()
    return {e.name: (e.dtype, e.shape, raw[header.data_start + e.begin:header.data_start + e.end])
            for e in header.tensors}


def safe_open_verdict(path: Path) -> Verdict:
    try:
        with safe_open(str(path), framework="pt") as handle:
            tensors = {}
            for name in handle.keys():  # noqa: SIM118 - safe_open has no __iter__
                tensor = handle.get_tensor(name)
                dtype = handle.get_slice(name).get_dtype()
                stored = tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
                tensors[name] = (dtype, tuple(tensor.shape), stored)
    except (SafetensorError, TypeError, ValueError) as exc:  # TypeError: a dtype torch cannot hold
        return Verdict(str(exc), {})
    return Verdict(None, tensors)


def documented_difference(ours: Verdict, theirs: Verdict, path: Path) -> bool:
    if ours.refusal is not None and theirs.refusal is None:
        return any(reason in ours.refusal for reason in DOCUMENTED_REFUSALS)
    if ours.refusal is None and theirs.refusal is not None:
        return has_tied_ranges(stored_header(path))  # two names on the very same bytes: read as tied
    return False


def stored_header(path: Path) -> object:
    """The header JSON as the file holds it (after every mutation), None when it does not parse."""
    raw = path.read_bytes()
    try:
        return json.loads(raw[8:8 + int.from_bytes(raw[:8], "little")])
    except ValueError:
        return None


def has_tied_ranges(header: object) -> bool:
    if not isinstance(header, dict):
        return False
    ranges = [tuple(spec["data_offsets"]) for name, spec in header.items() if name != "__metadata__"
              and isinstance(spec, dict) and isinstance(spec.get("data_offsets"), list)]
    nonempty = [r for r in ranges if len(r) == 2 and r[0] != r[1]]
    return len(set(nonempty)) < len(nonempty)


def check_agreement(path: Path) -> Verdict:
    """The differential itself: same refusals but for the documented ones, same tensors when both read."""
    ours, theirs = dtypelab_verdict(path), safe_open_verdict(path)
    if (ours.refusal is None) != (theirs.refusal is None):
        assert documented_difference(ours, theirs, path), (
            f"dtypelab: {ours.refusal or 'reads it'}; safe_open: {theirs.refusal or 'reads it'}; "
            f"header {path.read_bytes()[:400]!r}")
    elif ours.refusal is None:
        assert ours.tensors == theirs.tensors
    return ours


# --- strategies --------------------------------------------------------------------------------------

NAMES = st.one_of(
    st.text("abcxyz._0123456789", min_size=1, max_size=12),
    st.text(st.characters(exclude_categories=("Cc", "Cs")), min_size=1, max_size=6),
    st.sampled_from(["model.embed.weight", "\ud800", "x\udfff", "tab\there", "é", "__metadata_"]))
SHAPES = st.lists(st.integers(0, 4), max_size=3)


@st.composite
def valid_headers(draw) -> tuple[dict, bytes]:
    """A header of 0-5 tensors tiling their data exactly (in a random data order), and that data."""
    names = draw(st.lists(NAMES, max_size=5, unique=True))
    specs, data, offset = {}, b"", 0
    for name in draw(st.permutations(names)):
        dtype = draw(st.sampled_from([d for d in SAFETENSORS_DTYPES if d in DTYPES]))
        shape = draw(SHAPES)
        size = tensor_bytes(dtype, shape)
        specs[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        data += draw(st.binary(min_size=size, max_size=size))
        offset += size
    header = {name: specs[name] for name in names}  # JSON order is not data order
    strings = st.dictionaries(st.text(max_size=4), st.text(max_size=4), max_size=2)
    metadata = draw(st.one_of(st.none(), st.just({}), strings))
    if metadata is not None:
        header = {"__metadata__": metadata, **header}
    return header, data


def mutate_header(draw, header: dict) -> dict:
    """One structural change to a header: a field of the wrong type, an offset moved, an entry
    dropped, duplicated or tied, an unknown dtype, an extra key, odd metadata."""
    header = json.loads(json.dumps(header))
    names = [n for n in header if n != "__metadata__"]
    kind = draw(st.sampled_from(["dtype", "shape", "offsets", "drop", "tie", "extra key", "metadata",
                                 "entry type", "sub-byte"]))
    if not names or kind == "metadata":
        header["__metadata__"] = draw(st.sampled_from([None, [], "x", {"k": 1}, {"k": None}, {"k": "\ud800"},
                                                       {"k": {"a": "b"}}, {"\ud800": "v"}]))
        return header
    name = draw(st.sampled_from(names))
    spec = header[name]
    if kind == "dtype":
        spec["dtype"] = draw(st.sampled_from(BOGUS_DTYPES + SAFETENSORS_DTYPES))
    elif kind == "shape":
        spec["shape"] = draw(st.one_of(st.lists(st.integers(-2, 2**64 + 5), max_size=3),
                                       st.sampled_from([None, 3, "3", [1.0], [True], [[1]], [2**40, 2**40]])))
    elif kind == "offsets":
        spec["data_offsets"] = draw(st.one_of(
            st.lists(st.integers(-1, 64), min_size=0, max_size=3),
            st.sampled_from([None, [0.0, 4.0], [True, False], "0,4", [2**64, 2**64 + 4]])))
    elif kind == "drop":
        del header[name]
    elif kind == "tie":
        header[draw(NAMES.filter(lambda n: n not in header))] = dict(spec)
    elif kind == "extra key":
        spec[draw(st.sampled_from(["x", "offsets", "DTYPE"]))] = draw(st.sampled_from([1, None, "F32"]))
    elif kind == "entry type":
        header[name] = draw(st.sampled_from([None, [], "F32", 4, [spec["dtype"], spec["shape"]]]))
    else:  # sub-byte dtypes: sizes in bits, which byte sizes may not round
        spec["dtype"] = draw(st.sampled_from(["F4", "F6_E2M3", "F6_E3M2"]))
    return header


def encode(header: object, *, padding: bytes = b"", delta: int = 0, leading: bytes = b"") -> bytes:
    """The length field (off by ``delta``) and the header JSON (ASCII with \\u escapes), padded."""
    raw = leading + json.dumps(header).encode() + padding
    return struct.pack("<Q", max(len(raw) + delta, 0)) + raw


@st.composite
def mutated_files(draw) -> bytes:
    """A valid file, then one change: a structural one, the length off by a few bytes, odd padding or
    leading bytes, bytes added to or cut from the data, a bit flipped or a byte overwritten."""
    header, data = draw(valid_headers())
    padding, leading, delta = b"", b"", 0
    kind = draw(st.sampled_from(["structure"] * 4 + ["length", "padding", "leading", "data", "bit", "byte"]))
    if kind == "structure":
        header = mutate_header(draw, header)
    elif kind == "length":
        delta = draw(st.sampled_from([-7, -5, -3, -2, -1, 1, 2, 3, 5, 8]))
        padding = b" " * draw(st.integers(0, 8))
    elif kind == "padding":
        padding = draw(st.sampled_from([b" " * 3, b"       ", b"\t\n\r ", b"\0\0", b" x", b"\x0c"]))
    elif kind == "leading":
        leading = draw(st.sampled_from([b" ", b"\n\t", b"\xef\xbb\xbf", b"[", b"\0"]))
    elif kind == "data":
        data = draw(st.sampled_from([data + b"\0", data + b"\0" * 8, data[:-1], data[1:], b""]))
    raw = bytearray(encode(header, padding=padding, delta=delta, leading=leading) + data)
    header_end = min(len(raw), 8 + int.from_bytes(raw[:8], "little"))
    if kind in ("bit", "byte"):
        position = draw(st.integers(8, header_end - 1) if header_end > 8 else st.integers(0, 7))
        if kind == "bit":
            raw[position] ^= 1 << draw(st.integers(0, 7))
        else:
            raw[position] = draw(st.sampled_from(b'"{}[],:0 \\\x00\xff9e-.'))
    return bytes(raw)


# --- the properties ----------------------------------------------------------------------------------

@fuzz(examples=250)
@given(case=valid_headers())
def test_generated_valid_headers_read_as_safe_open_reads_them(tmp_path, case):
    header, data = case
    path = tmp_path / "m.safetensors"
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    check_agreement(path)


@fuzz(examples=1500)
@given(raw=mutated_files())
def test_mutated_headers_refused_exactly_where_safe_open_refuses(tmp_path, raw):
    path = tmp_path / "m.safetensors"
    path.write_bytes(raw)
    check_agreement(path)


@fuzz(examples=150)
@given(raw=st.binary(max_size=200), length=st.one_of(st.none(), st.integers(0, 2**64 - 1)))
def test_random_bytes_are_refused_in_one_line(tmp_path, raw, length):
    path = tmp_path / "m.safetensors"
    path.write_bytes((b"" if length is None else struct.pack("<Q", length)) + raw)
    check_agreement(path)


# --- what the fuzzer found, kept as explicit cases -----------------------------------------------------

FOUND = {
    # "description": (header bytes after the length field, data bytes)
    "a tensor name twice (safe_open keeps the last)":
        (b'{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},'
         b'"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}', b"\1"),
    "__metadata__ an empty list (read as no metadata before)": (b'{"__metadata__": []}', b""),
    "__metadata__ false": (b'{"__metadata__": false}', b""),
    "__metadata__ an empty string": (b'{"__metadata__": ""}', b""),
    "an offset spelt -0 (a float to safetensors)":
        (b'{"a":{"dtype":"U8","shape":[0],"data_offsets":[0,-0]}}', b""),
    "a dimension past 64 bits, times 0": (b'{"a":{"dtype":"U8","shape":[18446744073709551616,0],'
                                          b'"data_offsets":[0,0]}}', b""),
    "a dimension past int64, times 0 (torch cannot shape it)":
        (b'{"a":{"dtype":"U8","shape":[18446744073709551615,0],"data_offsets":[0,0]}}', b""),
    "a product past 64 bits before a 0": (b'{"a":{"dtype":"U8","shape":[4294967296,4294967296,0],'
                                          b'"data_offsets":[0,0]}}', b""),
    "-0 inside a name is only a name": (b'{"a-0":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}', b"\1"),
}


READ = {"-0 inside a name is only a name"}
"""The found cases both readers read (the others both refuse, or dtypelab refuses as documented)."""


@pytest.mark.parametrize("name", FOUND)
def test_found_cases(tmp_path, name):
    raw, data = FOUND[name]
    path = tmp_path / "m.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    assert (check_agreement(path).refusal is None) == (name in READ)
