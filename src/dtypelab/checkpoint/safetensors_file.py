"""The safetensors file format, read and written by hand so that nothing is memory-mapped.

A safetensors file is an 8-byte little-endian header length ``N``, ``N`` bytes of JSON (tensor name ->
dtype, shape, ``[begin, end)`` byte offsets into the data that follows, plus optional string
``__metadata__``), then the raw little-endian tensor data. ``safetensors.safe_open`` memory-maps the
file, and every page a mapping touches counts in the process's resident memory until it is closed;
parsing the header ourselves lets :mod:`dtypelab.checkpoint` inspect a checkpoint reading headers only
and convert it through small reused buffers.

Every check a hostile or damaged file can fail raises :class:`~dtypelab.errors.CheckpointError` with one
line naming the file (and the tensor, when there is one) and what to do about it.
"""

from __future__ import annotations

import errno
import json
import math
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import CheckpointError
from .guard import open_regular, read_json_file, refuse_links_outside

INDEX_SUFFIX = ".safetensors.index.json"
MAX_HEADER_BYTES = 100_000_000
"""Largest header accepted, in bytes (the limit the reference Rust implementation enforces)."""
MAX_TENSORS = 250_000
"""Most tensors one file may hold, counted in the raw header before it is parsed (real checkpoints hold a
few thousand per shard; 1.6 M zero-size entries took minutes and gigabytes to validate)."""

_DTYPE_NAMES: dict[str, str] = {
    "BOOL": "bool", "U8": "uint8", "I8": "int8", "I16": "int16", "U16": "uint16", "I32": "int32",
    "U32": "uint32", "I64": "int64", "U64": "uint64", "F16": "float16", "BF16": "bfloat16",
    "F32": "float32", "F64": "float64", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
    "F8_E8M0": "float8_e8m0fnu", "C64": "complex64",
}
DTYPES: dict[str, torch.dtype] = {
    code: getattr(torch, name) for code, name in _DTYPE_NAMES.items() if hasattr(torch, name)
}
"""Safetensors dtype code -> torch dtype, for every code this torch can hold."""

DTYPE_CODES: dict[torch.dtype, str] = {dtype: code for code, dtype in DTYPES.items()}

_NO_SPACE = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT}


@dataclass(frozen=True)
class TensorEntry:
    """One tensor as its header describes it.

    Args:
        name: the tensor's key in the header.
        dtype: safetensors dtype code (``"F32"``).
        shape: dimensions, outermost first.
        begin: first byte, relative to the start of the data section.
        end: one past the last byte, relative to the start of the data section.
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]


@dataclass(frozen=True)
class SafetensorsHeader:
    """A validated header: where every tensor's bytes are, and the file's string metadata.

    Args:
        path: the file the header was read from.
        header_bytes: length of the JSON header, padding included (``N``).
        file_bytes: size of the whole file.
        tensors: every entry, in data order (ties broken by name).
        metadata: the ``__metadata__`` mapping, empty when absent.
    """

    path: Path
    header_bytes: int
    file_bytes: int
    tensors: tuple[TensorEntry, ...]
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def data_start(self) -> int:
        """Absolute file offset of the first data byte."""
        return 8 + self.header_bytes

    def shared_groups(self) -> list[tuple[str, ...]]:
        """Names whose data are the same bytes (tied weights stored once), two or more per group."""
        groups: dict[tuple[int, int], list[str]] = {}
        for entry in self.tensors:
            if entry.nbytes:
                groups.setdefault((entry.begin, entry.end), []).append(entry.name)
        return [tuple(names) for names in groups.values() if len(names) > 1]


def read_header(path: str | os.PathLike, max_header_bytes: int = MAX_HEADER_BYTES) -> SafetensorsHeader:
    """Read and validate a safetensors header without touching the tensor data.

    Checks: a regular file, long enough, the header length fits the file and ``max_header_bytes``, at
    most :data:`MAX_TENSORS` entries, the header is a JSON object of well-formed entries with known dtypes
    and valid UTF-8 names, sizes match shapes, and the data ranges tile the data section exactly: no gap,
    no overlap, no trailing byte, as ``safetensors.safe_open`` requires ("not fully covered"), so a header
    length off by a few bytes into its own padding is refused, never read shifted. Identical ranges are
    tied tensors, allowed (safe_open refuses them).

    Args:
        path: a ``.safetensors`` file.
        max_header_bytes: refuse larger headers (a hostile length would otherwise be read into memory).

    Returns:
        The validated :class:`SafetensorsHeader`.

    Raises:
        CheckpointError: naming the file (and tensor) and the problem.
    """
    path = Path(path)
    with _open_read(path) as handle:
        file_bytes = os.fstat(handle.fileno()).st_size
        header_bytes = _read_length(path, handle, file_bytes, max_header_bytes)
        parsed = _parse_json(path, _read_counted(path, handle, header_bytes))
    metadata = _parse_metadata(path, parsed.pop("__metadata__", None))
    data_bytes = file_bytes - 8 - header_bytes
    entries = [_parse_entry(path, name, spec, data_bytes) for name, spec in parsed.items()]
    entries.sort(key=lambda e: (e.begin, e.end, e.name))
    _check_tiling(path, entries, data_bytes)
    return SafetensorsHeader(path, header_bytes, file_bytes, tuple(entries), metadata)


def _open_read(path: Path):
    return open_regular(path)  # a FIFO named *.safetensors is refused, never waited on


def _read_length(path: Path, handle, file_bytes: int, max_header_bytes: int) -> int:
    if file_bytes < 8:
        raise CheckpointError(f"{path}: truncated: {file_bytes} bytes, shorter than the 8-byte header "
                              "length every safetensors file starts with; re-download or re-save it")
    header_bytes = int.from_bytes(handle.read(8), "little")
    if header_bytes > max_header_bytes:
        raise CheckpointError(f"{path}: header length {header_bytes} bytes exceeds the {max_header_bytes}"
                              "-byte limit: not a safetensors file, or a hostile one; do not load it")
    if 8 + header_bytes > file_bytes:
        raise CheckpointError(f"{path}: header length {header_bytes} runs past the end of the file "
                              f"({file_bytes} bytes): truncated or not safetensors; re-download it")
    return header_bytes


def _reject_duplicates(pairs: list[tuple[str, object]]) -> dict:
    parsed = dict(pairs)
    if len(parsed) != len(pairs):
        keys = [key for key, _ in pairs]
        duplicate = next(key for key in keys if keys.count(key) > 1)
        raise ValueError(f"duplicate key {duplicate!r}")
    return parsed


_OFFSETS_KEY = b'"data_offsets"'
READ_STEP_BYTES = 8 << 20
"""A header is read this many bytes at a time, its tensors counted as it comes: one past
:data:`MAX_TENSORS` is refused after reading that far (a 95 MB header of 1.6 M tensors after 8 MiB)."""


def _read_counted(path: Path, handle, header_bytes: int) -> bytes:
    """The header's bytes, refused as soon as they list more than :data:`MAX_TENSORS` entries (each
    entry's ``"data_offsets"`` key counted in the raw bytes, in C, before any parsing)."""
    parts, count, tail, done = [], 0, b"", 0
    while done < header_bytes:
        part = handle.read(min(READ_STEP_BYTES, header_bytes - done))
        if not part:
            break  # the file shrank: the JSON is cut short and refused as such
        done += len(part)
        window = tail + part
        count += window.count(_OFFSETS_KEY)  # the tail is shorter than the key: none counted twice
        _check_count(path, count, partial=done < header_bytes)
        parts.append(part)
        tail = window[-(len(_OFFSETS_KEY) - 1):]
    return b"".join(parts)


def _minus_zero_as_float(text: str) -> int | float:
    """JSON's ``-0`` is a float to safetensors' parser (refused where an integer belongs); Python's
    parser makes it the integer 0. Read it as -0.0, so a shape or offset spelt ``-0`` is refused too."""
    return -0.0 if text == "-0" else int(text)


def _parse_json(path: Path, raw: bytes) -> dict:
    parse_int = _minus_zero_as_float if b"-0" in raw else None  # the hook only where it can matter
    try:
        parsed = json.loads(raw.decode("utf-8"), object_pairs_hook=_reject_duplicates, parse_int=parse_int)
    except RecursionError:
        raise CheckpointError(f"{path}: header JSON is nested too deep to be a safetensors header: "
                              "damaged or hostile; do not load it") from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise CheckpointError(f"{path}: header is not valid JSON ({exc}): the file is damaged or "
                              "not safetensors; re-download or re-save it") from None
    if not isinstance(parsed, dict):
        raise CheckpointError(f"{path}: header is JSON but not an object of tensors: not a safetensors file")
    _check_count(path, len(parsed) - ("__metadata__" in parsed))  # a key spelt with \u escapes
    return parsed


def _check_count(path: Path, count: int, partial: bool = False) -> None:
    """``partial``: ``count`` is what the bytes read so far list (the rest is never read)."""
    if count > MAX_TENSORS:
        listed = f"at least {count}" if partial else str(count)
        raise CheckpointError(f"{path}: header lists {listed} tensors, more than the {MAX_TENSORS} limit "
                              "per file: damaged or hostile; do not load it")


def _parse_metadata(path: Path, metadata: object) -> dict[str, str]:
    """``null`` or absent is no metadata (as safe_open reads it); ``[]``, ``""`` or ``0`` is refused."""
    if metadata is None:
        return {}
    if not isinstance(metadata, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise CheckpointError(f"{path}: __metadata__ must map strings to strings: the header is damaged")
    if not all(_is_utf8(k) and _is_utf8(v) for k, v in metadata.items()):
        raise CheckpointError(f"{path}: __metadata__ holds text that is not valid UTF-8 (a lone surrogate "
                              "escape): the header is damaged or hostile")
    return metadata


def _is_utf8(text: str) -> bool:
    """False for a JSON escape such as ``\\ud800`` that decodes to a lone surrogate: no UTF-8 for it."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


_CONTROL_OR_SURROGATE = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff]")
"""Unicode's Cc (control) and Cs (surrogate) categories, exactly: one regex search per name instead of a
category lookup per character (a third of an ordinary header's parse)."""


def check_tensor_name(path: Path, name: str) -> None:
    """Refuse empty names, names with control characters (they garble terminals and logs) and lone
    surrogates (no UTF-8 exists for them: printing or writing the name would fail)."""
    if not name or _CONTROL_OR_SURROGATE.search(name):
        raise CheckpointError(f"{path}: tensor {name!r}: empty name or control characters in it: "
                              "the header is damaged or hostile; do not load it")


_ENTRY_KEYS = frozenset({"dtype", "shape", "data_offsets"})


def _parse_entry(path: Path, name: str, spec: object, data_bytes: int) -> TensorEntry:
    """One header entry, checked; the error text is built only for an entry that fails (an ordinary
    header's parse is a few microseconds per tensor)."""
    check_tensor_name(path, name)
    if not isinstance(spec, dict) or not spec.keys() <= _ENTRY_KEYS:
        raise _entry_error(path, name, "entry must hold exactly dtype, shape and data_offsets")
    dtype, shape, offsets = spec.get("dtype"), spec.get("shape"), spec.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise _entry_error(path, name, f"unknown dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    if not _is_int_list(shape) or not _is_int_list(offsets) or len(offsets) != 2:
        raise _entry_error(path, name, "shape and data_offsets must be lists of non-negative integers")
    if _overflows(shape, DTYPES[dtype].itemsize):  # before any product: a hostile one took 40 s
        raise _entry_error(path, name, f"shape {shape}: its size overflows 64 bits, or a dimension is past "
                                       "int64 (no tensor can have it): the header is damaged or hostile")
    begin, end = offsets
    expected = math.prod(shape) * DTYPES[dtype].itemsize
    if end - begin != expected:
        raise _entry_error(path, name, f"data_offsets [{begin}, {end}] hold {end - begin} bytes but "
                                       f"shape {shape} of {dtype} needs {expected}: the header is damaged")
    if end > data_bytes:
        raise _entry_error(path, name, f"data ends at byte {end} but the file holds only {data_bytes} "
                                       "bytes of data: truncated; re-download it")
    return TensorEntry(name, dtype, tuple(shape), begin, end)


def _entry_error(path: Path, name: str, problem: str) -> CheckpointError:
    return CheckpointError(f"{path}: tensor {name!r}: {problem}")


_U64_MAX = 2**64 - 1
_I64_MAX = 2**63 - 1


def _is_int_list(value: object) -> bool:
    """A list of integers from 0 to 2^64 - 1 (safetensors' usize; JSON's bools and floats are not)."""
    return type(value) is list and all(type(item) is int and 0 <= item <= _U64_MAX for item in value)


def _overflows(shape: list[int], itemsize: int) -> bool:
    """As safetensors computes a tensor's size: the product of the dimensions, step by step, then times
    the element's bits, each within 64 bits (a later 0 does not undo an overflow); and every dimension
    within int64, which is what a torch shape holds."""
    numel = 1
    for dim in shape:
        numel *= dim
        if numel > _U64_MAX or dim > _I64_MAX:
            return True
    return numel * 8 * itemsize > _U64_MAX


def _check_tiling(path: Path, entries: list[TensorEntry], data_bytes: int) -> None:
    """Entries sorted by range must tile the data section: each starts where the previous ended (or is
    the very same range: tied tensors), and the last ends at the file's end."""
    previous: TensorEntry | None = None
    covered = 0
    for entry in entries:
        tied = previous is not None and (entry.begin, entry.end) == (previous.begin, previous.end)
        if tied and entry.nbytes:
            if entry.dtype != previous.dtype:
                raise CheckpointError(f"{path}: tensor {entry.name!r} shares its bytes with "
                                      f"{previous.name!r} but has another dtype: the header is damaged")
            continue
        if entry.begin < covered:
            raise CheckpointError(f"{path}: tensor {entry.name!r} overlaps {previous.name!r} (bytes "
                                  f"{entry.begin} < {covered}): the header is damaged or hostile")
        if entry.begin > covered:
            raise CheckpointError(f"{path}: tensor {entry.name!r} starts at data byte {entry.begin}, leaving "
                                  f"a gap after byte {covered}: the header is damaged, or its length is off")
        covered, previous = entry.end, entry if entry.nbytes else previous
    if covered != data_bytes:
        raise CheckpointError(f"{path}: the tensors cover {covered} of the {data_bytes} data bytes (not "
                              "fully covered): the header length is off or bytes were added; re-download it")


def encode_header(entries: list[tuple[str, str, tuple[int, ...], int, int]],
                  metadata: dict[str, str]) -> bytes:
    """Serialise a header: the 8-byte length, then JSON padded with spaces to a multiple of 8 bytes.

    Padding keeps the data section 8-byte aligned, as the reference writer does.

    Args:
        entries: ``(name, dtype code, shape, begin, end)`` per tensor, in data order.
        metadata: string metadata; omitted when empty.
    """
    header: dict[str, object] = {"__metadata__": metadata} if metadata else {}
    for name, dtype, shape, begin, end in entries:
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [begin, end]}
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-(8 + len(raw)) % 8)
    return len(raw).to_bytes(8, "little") + raw


def read_exact(fd: int, view: memoryview, offset: int, path: Path, name: str) -> None:
    """Fill ``view`` from ``fd`` at absolute ``offset``; a short read means the file shrank under us."""
    done = 0
    while done < len(view):
        count = os.preadv(fd, [view[done:]], offset + done)
        if count == 0:
            raise CheckpointError(f"{path}: tensor {name!r}: file ended at byte {offset + done}, before "
                                  "the data its header promised: truncated or changed while reading")
        done += count


def write_all(fd: int, view: memoryview, path: Path) -> None:
    """Write all of ``view``; a full disk (or file-size limit) becomes a one-line CheckpointError."""
    done = 0
    while done < len(view):
        try:
            done += os.write(fd, view[done:])
        except OSError as exc:
            raise _write_error(path, exc) from exc


def pwrite_all(fd: int, view: memoryview, offset: int, path: Path) -> None:
    """Write all of ``view`` at byte ``offset`` of the file (the file position is left alone)."""
    done = 0
    while done < len(view):
        try:
            done += os.pwrite(fd, view[done:], offset + done)
        except OSError as exc:
            raise _write_error(path, exc) from exc


def copy_range(src_fd: int, dst_fd: int, offset: int, count: int, buffer: bytearray,
               paths: tuple[Path, Path], name: str) -> None:
    """Copy ``count`` bytes from ``src_fd`` at ``offset`` to the current position of ``dst_fd``.

    Uses the kernel's ``copy_file_range`` (no user-space memory at all) and falls back to ``buffer``.
    ``paths`` (source, destination) name the files in errors.
    """
    while count:
        try:
            copied = os.copy_file_range(src_fd, dst_fd, count, offset)
        except OSError as exc:
            if exc.errno in _NO_SPACE:
                raise _write_error(paths[1], exc) from exc
            break
        if copied == 0:
            break
        offset, count = offset + copied, count - copied
    while count:
        view = memoryview(buffer)[:min(count, len(buffer))]
        read_exact(src_fd, view, offset, paths[0], name)
        write_all(dst_fd, view, paths[1])
        offset, count = offset + len(view), count - len(view)


def _write_error(path: Path, exc: OSError) -> CheckpointError:
    if exc.errno in _NO_SPACE:
        return CheckpointError(f"{path}: no space left to write ({exc.strerror}): free space or choose "
                               "another output folder; nothing was kept")
    return CheckpointError(f"{path}: cannot write ({exc.strerror}): check the output folder")


# ------------------------------------------------------------------- checkpoints: a file or a folder

@dataclass(frozen=True)
class CheckpointSource:
    """A checkpoint's validated shard headers.

    Args:
        path: the file or folder given.
        folder: the folder, or ``None`` for a single file.
        shards: one validated header per shard, in index order.
        index_name: the index file's name, when the folder has one.
        index_metadata: the index's ``metadata`` minus ``total_size``.
    """

    path: Path
    folder: Path | None
    shards: tuple[SafetensorsHeader, ...]
    index_name: str | None = None
    index_metadata: dict = field(default_factory=dict)


def open_checkpoint(path: str | os.PathLike) -> CheckpointSource:
    """Validate every shard header of a file or folder, reading no tensor data.

    Raises:
        CheckpointError: missing path, no safetensors in the folder, an index naming a missing shard or
            disagreeing with it, a tensor in two shards, or any damaged header.
    """
    path = Path(path)
    if path.is_file():
        return CheckpointSource(path, None, (read_header(path),))
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such file or folder: give a .safetensors file or a model folder")
    indexes = sorted(path.glob("*" + INDEX_SUFFIX))
    if len(indexes) > 1:
        raise CheckpointError(f"{path}: several safetensors indexes ({', '.join(i.name for i in indexes)}):"
                              " give the folder of one model")
    if indexes:
        return _open_indexed(path, indexes[0])
    files = sorted(path.glob("*.safetensors"))
    refuse_links_outside(path, files)
    if not files:
        raise CheckpointError(f"{path}: no .safetensors file in this folder: convert .bin weights to "
                              "safetensors first, or give the right folder")
    shards = tuple(read_header(file) for file in files)
    _check_unique_names(shards)
    return CheckpointSource(path, path, shards)


def _open_indexed(folder: Path, index: Path) -> CheckpointSource:
    weight_map, metadata = read_index(index)
    files = list(dict.fromkeys(weight_map.values()))
    refuse_links_outside(folder, [index, *(folder / file for file in files)])
    for name, file in weight_map.items():
        if not (folder / file).is_file():
            raise CheckpointError(f"{index}: names missing shard {file!r} (tensor {name!r}): "
                                  "re-download the checkpoint")
    shards = tuple(read_header(folder / file) for file in files)
    _check_unique_names(shards)
    held = {entry.name: shard.path.name for shard in shards for entry in shard.tensors}
    for name in {**weight_map, **held}:
        if held.get(name) != weight_map.get(name):
            raise CheckpointError(f"{index}: tensor {name!r}: index says shard {weight_map.get(name)!r} "
                                  f"but it is in {held.get(name)!r}: the index is stale; re-download it")
    metadata = {k: v for k, v in metadata.items() if k != "total_size"}
    return CheckpointSource(folder, folder, shards, index.name, metadata)


def read_index(index: Path) -> tuple[dict[str, str], dict]:
    """A shard index's ``weight_map`` (tensor -> shard file name) and ``metadata``, checked: a regular,
    bounded JSON file (:func:`~dtypelab.checkpoint.guard.read_json_file`) whose every shard is a plain
    ``.safetensors`` name inside the folder (no ``..``, no absolute path, no separator)."""
    parsed = read_json_file(index)
    weight_map = parsed.get("weight_map") if isinstance(parsed, dict) else None
    metadata = parsed.get("metadata", {}) if isinstance(parsed, dict) else None
    if not isinstance(weight_map, dict) or not isinstance(metadata, dict):
        raise CheckpointError(f"{index}: index must hold a weight_map object: re-download it")
    for name, file in weight_map.items():
        _check_shard_name(index, name, file)
    return weight_map, metadata


def _check_shard_name(index: Path, tensor: str, file: object) -> None:
    """A shard must be a plain file name inside the folder: no separators, no '..', no control bytes."""
    if (not isinstance(file, str) or not file.endswith(".safetensors") or file in {".", ".."}
            or re.search(r"[/\\\x00-\x1f\x7f]", file)):
        raise CheckpointError(f"{index}: tensor {tensor!r}: shard {file!r} is not a plain .safetensors "
                              "file name in the folder: the index is damaged or hostile")


def _check_unique_names(shards: Iterable[SafetensorsHeader]) -> None:
    seen: dict[str, Path] = {}
    for shard in shards:
        for entry in shard.tensors:
            if entry.name in seen:
                raise CheckpointError(f"{shard.path}: tensor {entry.name!r} is also in "
                                      f"{seen[entry.name].name}: shards must not repeat tensors")
            seen[entry.name] = shard.path
