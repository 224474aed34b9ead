"""Fuzzing GGUF headers (issue 18 item 7): dtypelab's own GGUF reader, fed generated valid files (read
exactly as written, and as the ``gguf`` package reads them), those files mutated (bits flipped, counts and
lengths overwritten with huge values, cut short, bytes inserted) and random bytes, must return a correct
header or raise one line of CheckpointError: never another exception, a hang or a large allocation."""

from __future__ import annotations

import os
import struct
import time
import tracemalloc
from pathlib import Path

import pytest
from hostile_helpers import fuzz
from hypothesis import given
from hypothesis import strategies as st

from dtypelab.checkpoint import read_gguf_header
from dtypelab.checkpoint.gguf_file import GGML_TYPES, GgufArray, GgufHeader
from dtypelab.errors import CheckpointError
from gguf_bytes import gguf, info, kv

MAX_SECONDS = 2.0
"""A header of a few KiB parses in milliseconds; seconds would mean work not bounded by the file."""
MAX_ALLOCATED_BYTES = 8 << 20
"""Peak Python allocation while reading a file of at most a few KiB (a count or length taken on trust
would allocate gigabytes)."""

KEYS = st.text("abcdefghijklmnopqrstuvwxyz._0123456789", min_size=1, max_size=16)
SCALAR_VALUES = {
    "u8": st.integers(0, 255), "i8": st.integers(-128, 127), "u16": st.integers(0, 2**16 - 1),
    "i16": st.integers(-2**15, 2**15 - 1), "u32": st.integers(0, 2**32 - 1),
    "i32": st.integers(-2**31, 2**31 - 1), "u64": st.integers(0, 2**64 - 1),
    "i64": st.integers(-2**63, 2**63 - 1), "bool": st.booleans(), "str": st.text(max_size=12),
    "f32": st.floats(width=32, allow_nan=False), "f64": st.floats(allow_nan=False),
}


@st.composite
def metadata_pairs(draw) -> list[tuple[str, str, object]]:
    """0-6 (key, kind, value) pairs of every value type, arrays of scalars and strings among them."""
    pairs = []
    for key in draw(st.lists(KEYS.filter(lambda k: k != "general.alignment"), max_size=6, unique=True)):
        kind = draw(st.sampled_from([*SCALAR_VALUES, "arr"]))
        if kind == "arr":
            element = draw(st.sampled_from(list(SCALAR_VALUES)))
            pairs.append((key, f"arr:{element}", draw(st.lists(SCALAR_VALUES[element], max_size=12))))
        else:
            pairs.append((key, kind, draw(SCALAR_VALUES[kind])))
    return pairs


PACKAGE_DIFFERS = {"Q8_1"}
"""Types the gguf package 0.19 sizes differently: its Q8_1 block is 40 bytes (float d and s), ggml's
``block_q8_1`` is 36 (two halves and 32 codes; ggml-common.h's static_assert); no model file holds Q8_1."""


@st.composite
def gguf_files(draw, types=GGML_TYPES) -> tuple[bytes, list, list, int]:
    """A valid GGUF v2/v3 file: metadata, 0-4 tensors of random GGML types placed at aligned offsets in
    random order (zero-size tensors among them), its data section. Returns the bytes, the pairs, the
    tensors ``(name, dims, type id, offset, nbytes)`` and the alignment."""
    pairs = draw(metadata_pairs())
    alignment = draw(st.sampled_from([None, 1, 8, 32, 64]))
    if alignment is not None:
        pairs.insert(draw(st.integers(0, len(pairs))), ("general.alignment", "u32", alignment))
    alignment = alignment or 32
    tensors, at = [], 0
    for name in draw(st.lists(KEYS, max_size=4, unique=True)):
        ggml = draw(st.sampled_from(types))
        dims = (ggml.block_size * draw(st.integers(0, 2)),
                *draw(st.lists(st.integers(1, 3), max_size=3)))
        nbytes = dims[0] // ggml.block_size * ggml.type_size * _prod(dims[1:])
        tensors.append((name, dims, ggml.id, at, nbytes))
        at = -(-(at + nbytes) // alignment) * alignment
    infos = [info(name, dims, type_id, offset) for name, dims, type_id, offset, _ in tensors]
    placed = [(offset + nbytes) for _, _, _, offset, nbytes in tensors]
    data = bytes(max(placed, default=0))
    raw = gguf([kv(*pair) for pair in pairs], infos, data, version=draw(st.sampled_from([2, 3])),
               alignment=alignment)
    return raw, pairs, tensors, alignment


def _prod(values) -> int:
    result = 1
    for value in values:
        result *= value
    return result


def read_bounded(path: Path) -> GgufHeader | None:
    """read_gguf_header within :data:`MAX_SECONDS` and :data:`MAX_ALLOCATED_BYTES`; None when it refused
    the file in one line; any other exception fails the test."""
    tracemalloc.start()
    start = time.perf_counter()
    try:
        return read_gguf_header(path)
    except CheckpointError as exc:
        assert len(str(exc).splitlines()) == 1, str(exc)
        return None
    finally:
        seconds = time.perf_counter() - start
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert seconds < MAX_SECONDS, f"{seconds:.1f} s for a {path.stat().st_size}-byte file"
        assert peak < MAX_ALLOCATED_BYTES, f"{peak:,} bytes allocated for a {path.stat().st_size}-byte file"


def expected_value(kind: str, value: object) -> object:
    """What the reader returns for a written pair: floats rounded to f32, arrays as their head."""
    if kind.startswith("arr:"):
        element = kind[4:]
        return GgufArray(element, len(value), tuple(expected_value(element, v) for v in value[:8]))
    if kind == "f32":
        return struct.unpack("<f", struct.pack("<f", value))[0]
    return value


# --- the properties ----------------------------------------------------------------------------------

@fuzz(examples=200)
@given(case=gguf_files())
def test_generated_files_read_exactly_as_written(tmp_path, case):
    raw, pairs, tensors, alignment = case
    path = tmp_path / "m.gguf"
    path.write_bytes(raw)
    header = read_bounded(path)
    assert header is not None
    assert header.alignment == alignment and header.file_bytes == len(raw)
    assert header.metadata == {key: expected_value(kind, value) for key, kind, value in pairs}
    assert [(t.name, t.dims, t.ggml_type.id, t.offset, t.nbytes) for t in header.tensors] == tensors


@fuzz(examples=60)
@given(case=gguf_files(types=[t for t in GGML_TYPES if t.name not in PACKAGE_DIFFERS]))
def test_generated_files_read_as_the_gguf_package_reads_them(tmp_path, case):
    gguf_package = pytest.importorskip("gguf")
    raw, _, tensors, _ = case
    path = tmp_path / "m.gguf"
    path.write_bytes(raw)
    header = read_bounded(path)
    theirs = gguf_package.GGUFReader(path)
    assert [(t.name, t.ggml_type.id, t.numel) for t in header.tensors] == [
        (t.name, int(t.tensor_type), int(t.n_elements)) for t in theirs.tensors]
    offsets = [header.data_start + t.offset for t in header.tensors]
    assert offsets == [int(t.data_offset) for t in theirs.tensors]


HUGE = [2**64 - 1, 2**63, 2**40, 2**32, 2**31 - 1, 1 << 24, 1 << 20]


@st.composite
def mutated_files(draw) -> bytes:
    """A valid file, then one change: a bit flipped, a byte overwritten, a u32 or u64 field overwritten
    with a huge or small value, the file cut short or bytes inserted."""
    raw = bytearray(draw(gguf_files())[0])
    kind = draw(st.sampled_from(["bit", "byte", "u64", "u32", "cut", "insert"]))
    position = draw(st.integers(0, len(raw) - 1))
    if kind == "bit":
        raw[position] ^= 1 << draw(st.integers(0, 7))
    elif kind == "byte":
        raw[position] = draw(st.sampled_from([0, 1, 0x7F, 0x80, 0xFF]))
    elif kind in ("u64", "u32"):
        fmt, size = ("<Q", 8) if kind == "u64" else ("<I", 4)
        value = draw(st.sampled_from([v % 2**(8 * size) for v in HUGE] + [0, 1, 9, 12, 13]))
        raw[position:position + size] = struct.pack(fmt, value)
    elif kind == "cut":
        del raw[position:]
    else:
        raw[position:position] = draw(st.binary(min_size=1, max_size=16))
    return bytes(raw)


@fuzz(examples=1000)
@given(raw=mutated_files())
def test_mutated_files_give_a_header_or_one_line(tmp_path, raw):
    path = tmp_path / "m.gguf"
    path.write_bytes(raw)
    header = read_bounded(path)
    if header is not None:  # what was read is consistent with the file it came from
        data_bytes = header.file_bytes - header.data_start
        assert all(t.offset % header.alignment == 0 and t.offset + t.nbytes <= data_bytes
                   for t in header.tensors)


@fuzz(examples=200)
@given(prefix=st.sampled_from([b"", b"GGUF", b"GGUF\x03\x00\x00\x00", b"GGUF\x02\x00\x00\x00"]),
       raw=st.binary(max_size=300))
def test_random_bytes_give_a_header_or_one_line(tmp_path, prefix, raw):
    path = tmp_path / "m.gguf"
    path.write_bytes(prefix + raw)
    read_bounded(path)


# --- what the fuzzer found, kept as explicit cases -----------------------------------------------------

def test_a_fifo_named_gguf_is_refused_without_blocking(tmp_path):
    """Found beside the fuzzer: the GGUF reader opened its file with a plain open(), which blocks on a
    FIFO until a writer comes (forever)."""
    path = tmp_path / "m.gguf"
    os.mkfifo(path)
    with pytest.raises(CheckpointError, match="not a regular file"):
        read_gguf_header(path)

