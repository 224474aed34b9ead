"""The GGUF container (llama.cpp's model file), read from its header alone: no tensor data is touched.

Checkpoint stage, beside :mod:`~dtypelab.checkpoint.safetensors_file`; imports base, report, formats and
quant only (here: errors and report). The reader is written by hand, not taken from the ``gguf`` package
(which stays the independent truth in the tests), so that a hostile header is refused with one line.

Layout (GGUF v2 and v3, little-endian): the magic ``GGUF``, version u32, tensor count u64, key/value
count u64; the key/value pairs (key: a string; value: a type u32 then the value; a string is a u64 byte
length and UTF-8 bytes; an array is an element type u32, a count u64 and the elements); one info per
tensor (name string, ``n_dims`` u32, ``n_dims`` u64 dimensions *innermost first*, GGML type u32, offset
u64 relative to the data section); padding to ``general.alignment`` (default 32); the data section.

Every count, length and offset is checked against a named limit and the bytes left in the file *before*
anything is allocated or read from it, so a hostile header costs bounded memory and time; each problem
is a :class:`~dtypelab.errors.CheckpointError` of one line naming the file, what is wrong and the fix.
"""

from __future__ import annotations

import math
import os
import struct
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from ..errors import CheckpointError
from ..report import Table, TableMixin
from .guard import open_regular

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
"""GGUF versions read; v1 (32-bit counts) has been unsupported by llama.cpp since 2023."""
DEFAULT_ALIGNMENT = 32
"""Alignment of the data section and of every tensor offset, in bytes, when ``general.alignment`` is
absent."""
MAX_TENSORS = 1_000_000
"""Most tensors accepted (the largest published models hold a few thousand)."""
MAX_KV_PAIRS = 1_000_000
"""Most metadata key/value pairs accepted (a model file holds a few dozen)."""
MAX_STRING_BYTES = 1 << 20
"""Longest string accepted, in bytes (1 MiB: chat templates, the longest real strings, are a few KiB)."""
MAX_ARRAY_ELEMENTS = 1 << 24
"""Most elements in one metadata array (16,777,216: vocabularies and merges hold up to ~10^6)."""
MAX_DIMS = 4
"""Most dimensions per tensor: ``GGML_MAX_DIMS`` in ggml.h (llama.cpp refuses more)."""
MAX_ELEMENTS = (1 << 63) - 1
"""Largest element count of a tensor: ggml counts elements in int64."""
ARRAY_HEAD = 8
"""Elements of each metadata array kept in memory (the rest is read, checked and dropped)."""

_MIN_KV_BYTES = 8 + 1 + 4  # key length, one key byte, value type (an empty value is a zero-length string)
_MIN_TENSOR_INFO_BYTES = 8 + 1 + 4 + 8 + 4 + 8  # name length, a name byte, n_dims, one dim, type, offset


@dataclass(frozen=True)
class GgmlType:
    """One GGML tensor type: ``block_size`` elements stored in ``type_size`` bytes.

    The numbers are ggml's type traits (``ggml/src/ggml-common.h`` block structs, ``ggml.h`` ids).
    """

    name: str
    id: int
    block_size: int
    type_size: int

    @property
    def bits_per_weight(self) -> float:
        """Stored bits per element, scales and minima of the block included."""
        return 8 * self.type_size / self.block_size


GGML_TYPES: tuple[GgmlType, ...] = (
    GgmlType("F32", 0, 1, 4),
    GgmlType("F16", 1, 1, 2),
    GgmlType("Q4_0", 2, 32, 2 + 16),
    GgmlType("Q4_1", 3, 32, 2 + 2 + 16),
    GgmlType("Q5_0", 6, 32, 2 + 4 + 16),
    GgmlType("Q5_1", 7, 32, 2 + 2 + 4 + 16),
    GgmlType("Q8_0", 8, 32, 2 + 32),
    GgmlType("Q8_1", 9, 32, 2 + 2 + 32),
    GgmlType("Q2_K", 10, 256, 2 + 2 + 256 // 16 + 256 // 4),
    GgmlType("Q3_K", 11, 256, 2 + 256 // 4 + 256 // 8 + 12),
    GgmlType("Q4_K", 12, 256, 2 + 2 + 12 + 256 // 2),
    GgmlType("Q5_K", 13, 256, 2 + 2 + 12 + 256 // 2 + 256 // 8),
    GgmlType("Q6_K", 14, 256, 2 + 256 // 16 + 3 * 256 // 4),
    GgmlType("Q8_K", 15, 256, 4 + 256 + 256 // 16 * 2),
    GgmlType("IQ2_XXS", 16, 256, 2 + 256 // 8 * 2),
    GgmlType("IQ2_XS", 17, 256, 2 + 256 // 8 * 2 + 256 // 32),
    GgmlType("IQ3_XXS", 18, 256, 2 + 3 * (256 // 8)),
    GgmlType("IQ1_S", 19, 256, 2 + 256 // 8 + 256 // 16),
    GgmlType("IQ4_NL", 20, 32, 2 + 16),
    GgmlType("IQ3_S", 21, 256, 2 + 13 * (256 // 32) + 256 // 64),
    GgmlType("IQ2_S", 22, 256, 2 + 256 // 4 + 256 // 16),
    GgmlType("IQ4_XS", 23, 256, 2 + 2 + 256 // 64 + 256 // 2),
    GgmlType("I8", 24, 1, 1),
    GgmlType("I16", 25, 1, 2),
    GgmlType("I32", 26, 1, 4),
    GgmlType("I64", 27, 1, 8),
    GgmlType("F64", 28, 1, 8),
    GgmlType("IQ1_M", 29, 256, 256 // 8 + 256 // 16 + 256 // 32),
    GgmlType("BF16", 30, 1, 2),
    GgmlType("TQ1_0", 34, 256, 2 + 256 // 64 + (256 - 4 * 256 // 64) // 5),
    GgmlType("TQ2_0", 35, 256, 2 + 256 // 4),
    GgmlType("MXFP4", 39, 32, 1 + 16),
    GgmlType("NVFP4", 40, 64, 4 + 32),
    GgmlType("Q1_0", 41, 128, 2 + 16),
)
"""Every GGML type a GGUF file can hold, with ggml's own block size and bytes per block."""

GGML_TYPES_BY_ID: dict[int, GgmlType] = {t.id: t for t in GGML_TYPES}
_REMOVED_TYPES = {4: "Q4_2", 5: "Q4_3", 31: "Q4_0_4_4", 32: "Q4_0_4_8", 33: "Q4_0_8_8", 36: "IQ4_NL_4_4",
                  37: "IQ4_NL_4_8", 38: "IQ4_NL_8_8"}
"""Type ids ggml has dropped from GGUF files (repacked layouts are built at load time now)."""

_SCALARS: dict[int, tuple[str, str]] = {
    0: ("u8", "<B"), 1: ("i8", "<b"), 2: ("u16", "<H"), 3: ("i16", "<h"), 4: ("u32", "<I"), 5: ("i32", "<i"),
    6: ("f32", "<f"), 7: ("bool", "<B"), 10: ("u64", "<Q"), 11: ("i64", "<q"), 12: ("f64", "<d"),
}
"""GGUF metadata value type id -> (name, struct format) for the fixed-size types."""
_STRING, _ARRAY = 8, 9


@dataclass(frozen=True)
class GgufArray:
    """A metadata array: its element type, its length, and its first :data:`ARRAY_HEAD` elements."""

    element_type: str
    count: int
    head: tuple[Any, ...]


@dataclass(frozen=True)
class GgufTensorInfo:
    """One tensor as the header describes it.

    Args:
        name: the tensor's name.
        ggml_type: its :class:`GgmlType`.
        dims: dimensions as GGUF stores them, innermost (contiguous) first -- gguf_dump's order.
        offset: first byte, relative to the start of the data section.
    """

    name: str
    ggml_type: GgmlType
    dims: tuple[int, ...]
    offset: int

    @property
    def shape(self) -> tuple[int, ...]:
        """Dimensions outermost first, as PyTorch and safetensors write them (``dims`` reversed)."""
        return tuple(reversed(self.dims))

    @property
    def numel(self) -> int:
        return math.prod(self.dims)

    @property
    def nbytes(self) -> int:
        """Stored bytes: whole blocks of the type (rows are a whole number of blocks, checked on reading)."""
        return self.numel // self.ggml_type.block_size * self.ggml_type.type_size


@dataclass(frozen=True)
class GgufHeader:
    """A validated GGUF header.

    Args:
        path: the file it was read from.
        version: GGUF version (2 or 3).
        file_bytes: size of the whole file.
        header_bytes: bytes from the magic to the end of the last tensor info (padding excluded).
        alignment: alignment of the data section and of tensor offsets, in bytes.
        metadata: key -> value (int, float, bool, str, or :class:`GgufArray`), in file order.
        value_types: key -> GGUF value type name (``"u32"``, ``"str"``, ``"arr"`` …).
        tensors: every tensor info, in file order.
    """

    path: Path
    version: int
    file_bytes: int
    header_bytes: int
    alignment: int
    metadata: dict[str, Any] = field(default_factory=dict)
    value_types: dict[str, str] = field(default_factory=dict)
    tensors: tuple[GgufTensorInfo, ...] = ()

    @property
    def data_start(self) -> int:
        """Absolute file offset of the data section: the header end rounded up to the alignment."""
        return -(-self.header_bytes // self.alignment) * self.alignment

    @property
    def tensor_bytes(self) -> int:
        """Stored tensor bytes, padding between tensors excluded."""
        return sum(t.nbytes for t in self.tensors)


@dataclass(frozen=True)
class GgufTensorRow:
    """One tensor of a GGUF file: ``shape`` outermost first (PyTorch's order), ``dims`` as stored
    (innermost first, gguf_dump's order); ``nbytes`` stored bytes; ``offset`` relative to the data section."""

    name: str
    ggml_type: str
    shape: tuple[int, ...]
    dims: tuple[int, ...]
    numel: int
    nbytes: int
    bits_per_weight: float
    offset: int


@dataclass(frozen=True)
class GgmlTypeTotal:
    """Tensors, elements and stored bytes of one GGML type; ``bits_per_weight`` = 8 × bytes / elements."""

    ggml_type: str
    tensors: int
    numel: int
    nbytes: int
    bits_per_weight: float


_SUMMARY_KEYS = ("context_length", "embedding_length", "block_count", "feed_forward_length",
                 "attention.head_count", "attention.head_count_kv")


@dataclass
class GgufInspection(TableMixin):
    """A GGUF file described from its header alone; renders as tables (text, HTML, JSON).

    Args:
        path: the file inspected.
        version: GGUF version.
        file_bytes: size of the file; ``data_start``: absolute offset of the data section; both in bytes.
        alignment: data alignment in bytes.
        tensors: one row per tensor, in file order.
        by_type: totals per GGML type, largest first.
        stored_bytes: stored tensor bytes (padding excluded); ``total_numel``: elements of all tensors.
        summary: the few keys that say what the model is (architecture, name, sizes), unprefixed.
        metadata: every key/value pair; arrays as :class:`GgufArray` (length and first elements).
        value_types: key -> GGUF value type name (``"u32"``, ``"str"``, ``"arr"`` …).
    """

    path: Path
    version: int
    file_bytes: int
    data_start: int
    alignment: int
    tensors: list[GgufTensorRow]
    by_type: list[GgmlTypeTotal]
    stored_bytes: int
    total_numel: int
    summary: dict[str, Any] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)
    value_types: dict[str, str] = field(default_factory=dict)

    @property
    def bytes_by_type(self) -> dict[str, int]:
        return {total.ggml_type: total.nbytes for total in self.by_type}

    @property
    def bits_per_weight(self) -> float:
        """Stored bits per element over all tensors."""
        return 8 * self.stored_bytes / self.total_numel if self.total_numel else 0.0

    def to_table(self) -> Table:
        rows = [[t.name, t.ggml_type, list(t.shape), t.numel, t.nbytes, t.bits_per_weight]
                for t in self.tensors]
        described = ", ".join(f"{key} {value}" for key, value in self.summary.items())
        notes = [f"GGUF v{self.version}, {self.file_bytes:,} bytes, data section at byte {self.data_start:,} "
                 f"(alignment {self.alignment}); {described}",
                 "shape: outermost first, as in PyTorch (GGUF stores and gguf_dump prints dims innermost "
                 "first: the JSON's dims); bits/weight: stored bits per element, block scales included"]
        return Table(f"{self.path}: {len(self.tensors)} tensors (GGUF header)",
                     ["name", "ggml_type", "shape", "numel", "nbytes", "bits_per_weight"], rows, notes,
                     default_columns=["name", "ggml_type", "shape", "nbytes", "bits_per_weight"])

    def to_tables(self) -> list[Table]:
        types = Table("Totals per GGML type", ["ggml_type", "tensors", "numel", "nbytes", "bits_per_weight"],
                      [[t.ggml_type, t.tensors, t.numel, t.nbytes, t.bits_per_weight] for t in self.by_type],
                      [f"total: {self.stored_bytes:,} bytes in {len(self.tensors)} tensors, "
                       f"{self.total_numel:,} elements, {self.bits_per_weight:.4g} bits per weight"])
        metadata = Table(f"Metadata: {len(self.metadata)} keys", ["key", "type", "value"],
                         [[key, self.value_types.get(key, ""), _show(value)]
                          for key, value in self.metadata.items()])
        return [self.to_table(), types, metadata]


def read_gguf_header(path: str | os.PathLike) -> GgufHeader:
    """Read and validate a GGUF header without touching the tensor data.

    Checks: magic and version; counts, string and array lengths against the named limits and against the
    bytes left in the file (before reading them); UTF-8 keys, strings and names; no duplicate keys or
    tensor names; known value and GGML types; 1 to :data:`MAX_DIMS` dimensions, the element count within
    int64, the innermost dimension a whole number of blocks; tensor offsets aligned, inside the file and
    not overlapping.

    Args:
        path: a ``.gguf`` file.

    Returns:
        The validated :class:`GgufHeader`.

    Raises:
        CheckpointError: one line naming the file (and key or tensor) and the problem.
    """
    path = Path(path)
    with open_regular(path) as handle:  # a FIFO named *.gguf is refused, never waited on
        reader = _Reader(path, handle, os.fstat(handle.fileno()).st_size)
        version, tensor_count, kv_count = _read_preamble(reader)
        metadata, value_types = _read_metadata(reader, kv_count)
        alignment = _alignment(path, metadata, value_types)
        tensors = [_read_tensor_info(reader, index) for index in range(tensor_count)]
        header = GgufHeader(path, version, reader.size, reader.pos, alignment, metadata, value_types,
                            tuple(tensors))
    _check_tensors(header)
    return header


def inspect_gguf(path: str | os.PathLike) -> GgufInspection:
    """Describe a ``.gguf`` file from its header alone: every tensor, totals per GGML type, metadata.

    What llama.cpp's ``gguf_dump.py`` shows, with stored bytes and bits per weight. No tensor data is
    read; see :func:`read_gguf_header` for what is checked.

    Example:
        >>> inspect_gguf("SmolLM2-135M-Instruct.Q4_1.gguf").bytes_by_type  # doctest: +SKIP
        {'Q4_1': ..., 'Q8_0': ..., 'F32': ...}
    """
    header = read_gguf_header(path)
    rows = [GgufTensorRow(t.name, t.ggml_type.name, t.shape, t.dims, t.numel, t.nbytes,
                          t.ggml_type.bits_per_weight, t.offset) for t in header.tensors]
    totals: dict[str, list[int]] = {}
    for row in rows:
        count = totals.setdefault(row.ggml_type, [0, 0, 0])
        count[0], count[1], count[2] = count[0] + 1, count[1] + row.numel, count[2] + row.nbytes
    by_type = sorted((GgmlTypeTotal(name, tensors, numel, nbytes, 8 * nbytes / numel if numel else 0.0)
                      for name, (tensors, numel, nbytes) in totals.items()), key=lambda t: -t.nbytes)
    return GgufInspection(header.path, header.version, header.file_bytes, header.data_start, header.alignment,
                          rows, by_type, header.tensor_bytes, sum(r.numel for r in rows),
                          _summary(header.metadata), dict(header.metadata), dict(header.value_types))


class _Reader:
    """Reads a file front to back through Python's buffered I/O, refusing to read past its end."""

    def __init__(self, path: Path, handle: BinaryIO, size: int) -> None:
        self.path, self.handle, self.size, self.pos = path, handle, size, 0

    @property
    def remaining(self) -> int:
        return self.size - self.pos

    def fail(self, what: str) -> CheckpointError:
        return CheckpointError(f"{self.path}: {what}: the GGUF header is damaged or hostile; re-download or "
                               "re-convert the file, do not load it")

    def take(self, count: int, what: str) -> bytes:
        if count > self.remaining:
            raise CheckpointError(f"{self.path}: truncated: {what} needs {count:,} bytes at offset "
                                  f"{self.pos:,} but the file ends at {self.size:,} bytes: the file is cut "
                                  "short; re-download it")
        raw = self.handle.read(count)
        if len(raw) != count:
            raise CheckpointError(f"{self.path}: the file shrank while being read (offset {self.pos:,}): "
                                  "wait until it is fully written and retry")
        self.pos += count
        return raw

    def skip(self, count: int, what: str) -> None:
        if count > self.remaining:
            self.take(count, what)  # raises the truncation message
        self.handle.seek(count, os.SEEK_CUR)
        self.pos += count

    def unpack(self, fmt: str, what: str) -> Any:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt), what))[0]

    def u32(self, what: str) -> int:
        return self.unpack("<I", what)

    def u64(self, what: str) -> int:
        return self.unpack("<Q", what)

    def string(self, what: str) -> str:
        length = self.u64(f"the length of {what}")
        if length > MAX_STRING_BYTES:
            raise self.fail(f"{what} claims {length:,} bytes, over the {MAX_STRING_BYTES:,}-byte limit")
        raw = self.take(length, what)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise self.fail(f"{what} is not valid UTF-8 (byte {exc.start})") from None


def _read_preamble(reader: _Reader) -> tuple[int, int, int]:
    magic = reader.take(4, "the magic")
    if magic != GGUF_MAGIC:
        raise CheckpointError(f"{reader.path}: not a GGUF file (starts with {magic!r}, not {GGUF_MAGIC!r}): "
                              "check the path, or re-download the file")
    version = reader.u32("the version")
    if version not in SUPPORTED_VERSIONS:
        hint = ("a big-endian file, or not GGUF" if version and version & 0xFFFF == 0 else
                "GGUF v1, unsupported since 2023: re-convert it with a current llama.cpp" if version == 1 else
                "a version this reader does not know: update dtypelab, or re-convert the file")
        raise CheckpointError(f"{reader.path}: GGUF version {version} is not supported (reads "
                              f"{', '.join(map(str, SUPPORTED_VERSIONS))}): {hint}")
    tensor_count, kv_count = reader.u64("the tensor count"), reader.u64("the metadata count")
    if tensor_count > MAX_TENSORS:
        raise reader.fail(f"the header claims {tensor_count:,} tensors, over the {MAX_TENSORS:,} limit")
    if kv_count > MAX_KV_PAIRS:
        raise reader.fail(f"the header claims {kv_count:,} metadata pairs, over the {MAX_KV_PAIRS:,} limit")
    needed = tensor_count * _MIN_TENSOR_INFO_BYTES + kv_count * _MIN_KV_BYTES
    if needed > reader.remaining:
        raise reader.fail(f"{tensor_count:,} tensors and {kv_count:,} metadata pairs need at least "
                          f"{needed:,} header bytes but only {reader.remaining:,} are left in the file")
    return version, tensor_count, kv_count


def _read_metadata(reader: _Reader, kv_count: int) -> tuple[dict[str, Any], dict[str, str]]:
    metadata: dict[str, Any] = {}
    value_types: dict[str, str] = {}
    for index in range(kv_count):
        key = reader.string(f"metadata key {index}")
        if not key:
            raise reader.fail(f"metadata key {index} is empty")
        if key in metadata:
            raise reader.fail(f"metadata key {key!r} appears twice")
        type_id = reader.u32(f"the type of metadata {key!r}")
        if type_id == _ARRAY:
            metadata[key], value_types[key] = _read_array(reader, key), "arr"
        else:
            metadata[key] = _read_value(reader, type_id, f"metadata {key!r}")
            value_types[key] = _type_name(type_id)
    return metadata, value_types


def _type_name(type_id: int) -> str:
    return "str" if type_id == _STRING else _SCALARS[type_id][0]


def _read_value(reader: _Reader, type_id: int, what: str) -> Any:
    if type_id == _STRING:
        return reader.string(what)
    if type_id not in _SCALARS:
        raise reader.fail(f"{what} has unknown value type {type_id} (GGUF knows 0 to 12)")
    name, fmt = _SCALARS[type_id]
    value = reader.unpack(fmt, what)
    if name == "bool":
        if value > 1:
            raise reader.fail(f"{what} is a bool stored as {value} (GGUF allows only 0 and 1)")
        return bool(value)
    return value


def _read_array(reader: _Reader, key: str) -> GgufArray:
    what = f"metadata array {key!r}"
    element_type = reader.u32(f"the element type of {what}")
    count = reader.u64(f"the length of {what}")
    if element_type == _ARRAY:
        raise reader.fail(f"{what} is an array of arrays, which llama.cpp does not read")
    if element_type != _STRING and element_type not in _SCALARS:
        raise reader.fail(f"{what} has unknown element type {element_type} (GGUF knows 0 to 12)")
    if count > MAX_ARRAY_ELEMENTS:
        raise reader.fail(f"{what} claims {count:,} elements, over the {MAX_ARRAY_ELEMENTS:,} limit")
    element_bytes = 8 if element_type == _STRING else struct.calcsize(_SCALARS[element_type][1])
    if count * element_bytes > reader.remaining:
        raise reader.fail(f"{what} claims {count:,} elements, at least {count * element_bytes:,} bytes, but "
                          f"only {reader.remaining:,} are left in the file")
    head = tuple(_read_value(reader, element_type, f"element {i} of {what}")
                 for i in range(min(count, ARRAY_HEAD)))
    if element_type == _STRING:  # every string is read and checked, only the head is kept
        for i in range(len(head), count):
            reader.string(f"element {i} of {what}")
    elif _SCALARS[element_type][0] == "bool":  # checked in C: a 16 M-element array in milliseconds
        rest = reader.take(count - len(head), what)
        bad = len(rest) - len(rest.lstrip(b"\x00\x01"))  # the first byte that is neither 0 nor 1
        if bad < len(rest):
            raise reader.fail(f"element {len(head) + bad} of {what} is a bool stored as {rest[bad]} "
                              "(GGUF allows only 0 and 1)")
    else:
        reader.skip((count - len(head)) * element_bytes, what)
    return GgufArray(_type_name(element_type), count, head)


def _alignment(path: Path, metadata: dict[str, Any], value_types: dict[str, str]) -> int:
    if "general.alignment" not in metadata:
        return DEFAULT_ALIGNMENT
    alignment = metadata["general.alignment"]
    if value_types["general.alignment"] != "u32" or alignment <= 0 or alignment & (alignment - 1):
        raise CheckpointError(f"{path}: general.alignment must be a u32 power of two, not "
                              f"{value_types['general.alignment']} {alignment!r}: the GGUF header is "
                              "damaged; re-convert the file")
    return alignment


def _read_tensor_info(reader: _Reader, index: int) -> GgufTensorInfo:
    name = reader.string(f"the name of tensor {index}")
    if not name or any(unicodedata.category(char) == "Cc" for char in name):
        raise reader.fail(f"tensor {index} has an empty name or control characters in it ({name!r})")
    what = f"tensor {name!r}"
    n_dims = reader.u32(f"the dimension count of {what}")
    if not 1 <= n_dims <= MAX_DIMS:
        raise reader.fail(f"{what} has {n_dims} dimensions (GGUF model tensors have 1 to {MAX_DIMS})")
    dims = tuple(reader.u64(f"dimension {i} of {what}") for i in range(n_dims))
    numel = 1
    for dim in dims:
        numel *= dim
        if numel > MAX_ELEMENTS:
            raise reader.fail(f"{what} has dimensions {list(dims)} whose product overflows int64")
    type_id = reader.u32(f"the GGML type of {what}")
    ggml_type = GGML_TYPES_BY_ID.get(type_id)
    if ggml_type is None:
        if type_id in _REMOVED_TYPES:
            raise CheckpointError(f"{reader.path}: {what} has GGML type {_REMOVED_TYPES[type_id]} (id "
                                  f"{type_id}), removed from GGUF by llama.cpp: re-convert the file with a "
                                  "current llama.cpp")
        raise CheckpointError(f"{reader.path}: {what} has unknown GGML type id {type_id} (dtypelab knows "
                              f"{len(GGML_TYPES)} types, ids 0 to {max(GGML_TYPES_BY_ID)}): the file is "
                              "damaged, or uses a type newer than this dtypelab; update it or re-convert")
    if dims[0] % ggml_type.block_size:
        raise reader.fail(f"{what} of type {ggml_type.name} has {dims[0]:,} elements per row (innermost "
                          f"dimension), not a multiple of its {ggml_type.block_size}-element block")
    offset = reader.u64(f"the data offset of {what}")
    return GgufTensorInfo(name, ggml_type, dims, offset)


def _check_tensors(header: GgufHeader) -> None:
    """Names unique; offsets aligned, inside the file, not overlapping (zero-byte tensors may share one)."""
    path, seen = header.path, set()
    data_bytes = header.file_bytes - header.data_start
    for tensor in header.tensors:
        where = f"{path}: tensor {tensor.name!r}"
        if tensor.name in seen:
            raise CheckpointError(f"{where} appears twice: the GGUF header is damaged; re-convert the file")
        seen.add(tensor.name)
        if tensor.offset % header.alignment:
            raise CheckpointError(f"{where}: data offset {tensor.offset:,} is not a multiple of the "
                                  f"{header.alignment}-byte alignment: the header is damaged; re-convert it")
        if tensor.offset + tensor.nbytes > data_bytes:
            end = tensor.offset + tensor.nbytes
            raise CheckpointError(f"{where}: bytes [{tensor.offset:,}, {end:,}) of the data section run past "
                                  f"the end of the file ({max(data_bytes, 0):,} data bytes): truncated or "
                                  "damaged; re-download it")
    placed = sorted((t for t in header.tensors if t.nbytes), key=lambda t: (t.offset, t.name))
    for before, after in zip(placed, placed[1:], strict=False):
        if after.offset < before.offset + before.nbytes:
            raise CheckpointError(f"{path}: tensors {before.name!r} and {after.name!r} overlap in the data "
                                  f"section (at byte {after.offset:,}): the header is damaged or hostile; "
                                  "do not load it")


def _summary(metadata: dict[str, Any]) -> dict[str, Any]:
    """Architecture, name, file type and the architecture's sizes, keys without their prefix."""
    summary = {key.removeprefix("general."): metadata[key] for key in
               ("general.architecture", "general.name", "general.file_type") if key in metadata}
    arch = metadata.get("general.architecture")
    if isinstance(arch, str):
        summary |= {key: metadata[f"{arch}.{key}"] for key in _SUMMARY_KEYS if f"{arch}.{key}" in metadata}
    tokens = metadata.get("tokenizer.ggml.tokens")
    if isinstance(tokens, GgufArray):
        summary["vocabulary"] = tokens.count
    return summary


def _show(value: Any, width: int = 60) -> str:
    """A metadata value on one line: long strings cut, arrays as length and first elements."""
    if isinstance(value, GgufArray):
        head = ", ".join(_show(v, 16) for v in value.head)
        more = ", …" if value.count > len(value.head) else ""
        return _cut(f"[{value.count:,} × {value.element_type}] [{head}{more}]", 2 * width)
    return _cut(repr(value) if isinstance(value, str) else str(value), width)


def _cut(text: str, width: int) -> str:
    return text if len(text) <= width else text[:width - 1] + "…"
