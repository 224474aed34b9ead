"""How a conversion lays out and writes its output: plan the shards, stream the tensors, verify.

:func:`plan_output` decides, from headers alone, which tensors are cast or copied, how they are
grouped into output files (resharding by size when asked) and where each one's bytes go.
:func:`write_shards` then streams every tensor from its source file into its output file through
one :class:`~dtypelab.damage.ChunkCaster`'s reused buffers; :func:`verify_output` re-reads the result.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shutil
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch

from .damage import ChunkCaster, TensorDamage, dtype_name
from .errors import CheckpointError, DamageError, InputError
from .formats import NumberFormat
from .safetensors_format import (
    DTYPE_CODES,
    DTYPES,
    INDEX_SUFFIX,
    CheckpointSource,
    SafetensorsHeader,
    TensorEntry,
    copy_range,
    encode_header,
    read_exact,
    read_header,
    write_all,
)

CAST_DTYPES = frozenset({"F16", "BF16", "F32", "F64"})
"""Source dtypes that are cast; integers, bool and already-quantized fp8 payloads are copied as they are."""

ProgressCallback = Callable[[int, int], None]
"""Called as ``progress(bytes_done, bytes_total)`` while tensor data streams."""


@dataclass(frozen=True)
class PlannedTensor:
    """One stored tensor to write: its names (tied ones share), source, action and output dtype code."""

    names: tuple[str, ...]
    entry: TensorEntry
    shard: SafetensorsHeader
    action: str
    out_dtype: str

    @property
    def out_nbytes(self) -> int:
        return self.entry.numel * DTYPES[self.out_dtype].itemsize


@dataclass
class PlannedShard:
    """One output file: items ordered by element size (keeps every tensor aligned), then offsets."""

    file: str
    items: list[PlannedTensor]
    metadata: dict[str, str]

    def layout(self) -> tuple[bytes, list[tuple[PlannedTensor, int, int]]]:
        placed, offset = [], 0
        for item in sorted(self.items, key=lambda i: -DTYPES[i.out_dtype].itemsize):
            placed.append((item, offset, offset + item.out_nbytes))
            offset += item.out_nbytes
        entries = [(name, item.out_dtype, item.entry.shape, begin, end)
                   for item, begin, end in placed for name in item.names]
        return encode_header(entries, self.metadata), placed


@dataclass
class OutputPlan:
    """Everything a conversion will write, decided from headers before any byte is read.

    Args:
        shards: the output files in order.
        index_name: the index file to write, or ``None`` for a single unindexed file.
        index_metadata: the source index's metadata to carry over (``total_size`` is recomputed).
    """

    shards: list[PlannedShard]
    index_name: str | None
    index_metadata: dict

    @property
    def items(self) -> list[PlannedTensor]:
        return [item for shard in self.shards for item in shard.items]


def parse_size(text: str | int | None) -> int | None:
    """``"5GB"`` -> 5_000_000_000, ``"500MiB"`` -> 524_288_000, ``1024`` -> 1024 (bytes), as HF reads them."""
    if text is None or isinstance(text, int):
        return text
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
             "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", str(text))
    if not match or match.group(2).upper() not in units or float(match.group(1)) <= 0:
        raise InputError(f"cannot read size {text!r}: write e.g. 5GB, 500MiB or a number of bytes")
    return int(float(match.group(1)) * units[match.group(2).upper()])


def _plan_tensors(source: CheckpointSource, fmt: NumberFormat,
                  keep: tuple[str, ...]) -> list[list[PlannedTensor]]:
    """Per source shard, the stored tensors to write; tied names grouped into one item."""
    target, matched, per_shard = DTYPE_CODES[fmt.torch_dtype], set(), []
    for shard in source.shards:
        groups: dict[tuple[int, int] | str, list[TensorEntry]] = {}
        for entry in shard.tensors:
            groups.setdefault((entry.begin, entry.end) if entry.nbytes else entry.name, []).append(entry)
        items = []
        for entries in groups.values():
            names = tuple(e.name for e in entries)
            hits = {p for p in keep for n in names if n == p or fnmatch.fnmatchcase(n, p)}
            matched |= hits
            action = _action(entries[0].dtype, target, kept=bool(hits))
            items.append(PlannedTensor(names, entries[0], shard, action,
                                       target if action == "cast" else entries[0].dtype))
        per_shard.append(items)
    for pattern in keep:
        if pattern not in matched:
            raise InputError(f"keep pattern {pattern!r} matches no tensor: check the names with "
                             "`dtypelab inspect`")
    return per_shard


def _action(dtype: str, target: str, kept: bool) -> str:
    """``"kept"`` (a keep pattern matched), ``"cast"``, or ``"copied"`` (not cast: bit for bit)."""
    if kept:
        return "kept"
    return "cast" if dtype in CAST_DTYPES and dtype != target else "copied"


def plan_output(source: CheckpointSource, dst: Path, dst_is_file: bool, fmt: NumberFormat,
                keep: tuple[str, ...], max_shard_bytes: int | None) -> OutputPlan:
    """Plan the output files: the source's own shards, or new ones of at most ``max_shard_bytes``.

    Resharded files are named like transformers names them (``model-00001-of-00003.safetensors``,
    with ``model.safetensors.index.json``); a single one is ``model.safetensors`` without an index.
    """
    per_shard = _plan_tensors(source, fmt, keep)
    if max_shard_bytes is None:
        names = [dst.name if dst_is_file else s.path.name for s in source.shards]
        shards = [PlannedShard(n, items, s.metadata)
                  for n, items, s in zip(names, per_shard, source.shards, strict=True)]
        return OutputPlan(shards, source.index_name, source.index_metadata)
    groups = _pack([item for items in per_shard for item in items], max_shard_bytes)
    metadata = {k: v for shard in source.shards for k, v in shard.metadata.items()}
    prefix = source.index_name.removesuffix(INDEX_SUFFIX) if source.index_name else "model"
    if len(groups) == 1:
        name = dst.name if dst_is_file else f"{prefix}.safetensors"
        return OutputPlan([PlannedShard(name, groups[0], metadata)], None, source.index_metadata)
    if dst_is_file:
        raise InputError(f"{dst}: {len(groups)} shards of at most {max_shard_bytes} bytes need a folder: "
                         "give -o a folder name")
    count = len(groups)
    shards = [PlannedShard(f"{prefix}-{i:05d}-of-{count:05d}.safetensors", g, metadata)
              for i, g in enumerate(groups, 1)]
    return OutputPlan(shards, prefix + INDEX_SUFFIX, source.index_metadata)


def _pack(items: list[PlannedTensor], max_bytes: int) -> list[list[PlannedTensor]]:
    """Fill files in order up to ``max_bytes``; a tensor larger than that gets a file of its own."""
    groups: list[list[PlannedTensor]] = [[]]
    size = 0
    for item in items:
        if groups[-1] and size + item.out_nbytes > max_bytes:
            groups.append([])
            size = 0
        groups[-1].append(item)
        size += item.out_nbytes
    return groups


def write_shards(plan: OutputPlan, folder: Path, caster: ChunkCaster, strict: bool,
                 progress: ProgressCallback | None) -> list[TensorDamage]:
    """Write every planned shard into ``folder``; return each stored tensor's damage, in output order.

    Raises:
        DamageError: under ``strict``, at the first tensor that lost values.
    """
    total, done, damage = sum(i.entry.nbytes for i in plan.items), [0], []

    def tick(count: int) -> None:
        done[0] += count
        if progress is not None:
            progress(done[0], total)

    with ExitStack() as stack:
        sources = _open_sources(plan, stack)
        for shard in plan.shards:
            damage += _write_shard(shard, folder / shard.file, sources, caster, strict, tick)
    return damage


def _write_shard(shard: PlannedShard, path: Path, sources: dict[Path, int], caster: ChunkCaster,
                 strict: bool, tick: Callable[[int], None]) -> list[TensorDamage]:
    header, placed = shard.layout()
    fd = _create(path)
    damage = []
    try:
        write_all(fd, memoryview(header), path)
        for position, (item, _, _) in enumerate(placed):
            if position + 1 < len(placed):
                _prefetch(placed[position + 1][0], sources)
            result = _stream_item(item, sources[item.shard.path], fd, path, caster, tick)
            if strict and result.lost_values:
                raise _damage_error(result, caster.fmt)
            damage.append(result)
    finally:
        os.close(fd)
    return damage


def _prefetch(item: PlannedTensor, sources: dict[Path, int]) -> None:
    """Ask the kernel to start reading the next tensor while this one is cast (page cache, not RSS)."""
    start = item.shard.data_start + item.entry.begin
    if item.entry.nbytes:  # a length of 0 would mean "to the end of the file"
        os.posix_fadvise(sources[item.shard.path], start, item.entry.nbytes, os.POSIX_FADV_WILLNEED)


def _open_sources(plan: OutputPlan, stack: ExitStack) -> dict[Path, int]:
    sources = {}
    for item in plan.items:
        if item.shard.path not in sources:
            sources[item.shard.path] = os.open(item.shard.path, os.O_RDONLY)
            stack.callback(os.close, sources[item.shard.path])
    return sources


def _create(path: Path) -> int:
    try:
        return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot create ({exc.strerror}): check the output folder") from exc


def _stream_item(item: PlannedTensor, src_fd: int, dst_fd: int, path: Path, caster: ChunkCaster,
                 tick: Callable[[int], None]) -> TensorDamage:
    """Write one tensor: bytes copied by the kernel, or cast chunk by chunk through the caster."""
    entry, start = item.entry, item.shard.data_start + item.entry.begin
    result = TensorDamage(entry.name, dtype_name(entry.torch_dtype), dtype_name(DTYPES[item.out_dtype]),
                          item.action, entry.numel, aliases=item.names[1:])
    if item.action != "cast":
        copy_range(src_fd, dst_fd, start, entry.nbytes, caster.raw, (item.shard.path, path), entry.name)
        tick(entry.nbytes)
        return result
    itemsize = entry.torch_dtype.itemsize
    for first in range(0, entry.numel, caster.chunk_elements):
        count = min(caster.chunk_elements, entry.numel - first)
        read_exact(src_fd, memoryview(caster.raw)[:count * itemsize], start + first * itemsize,
                   item.shard.path, entry.name)
        out, chunk = caster.cast(entry.torch_dtype, count)
        write_all(dst_fd, out, path)
        result = result.merged(chunk)
        tick(count * itemsize)
    return result


def _damage_error(damage: TensorDamage, fmt: NumberFormat) -> DamageError:
    return DamageError(f"tensor {damage.name!r}: {damage.overflowed} values overflow and "
                       f"{damage.flushed_to_zero} flush to zero in {fmt.name}; nothing was written "
                       f"(--strict): keep it with --keep {damage.name!r} or drop --strict")


def write_index(plan: OutputPlan, folder: Path) -> None:
    if plan.index_name is None:
        return
    weight_map = {name: shard.file for shard in plan.shards for item in shard.items for name in item.names}
    total = sum(item.out_nbytes for item in plan.items)
    index = {"metadata": {**plan.index_metadata, "total_size": total},
             "weight_map": dict(sorted(weight_map.items()))}
    _write_text(folder / plan.index_name, json.dumps(index, indent=2) + "\n")


def _write_text(path: Path, text: str) -> None:
    try:
        path.write_text(text, encoding="utf-8")
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot write ({exc.strerror}): free space or choose another "
                              "output folder; nothing was kept") from exc


def copy_extra(src: CheckpointSource, extra: list[Path], folder: Path, fmt: NumberFormat,
                plan: OutputPlan) -> bool:
    """Copy the folder's other files; rewrite config.json's dtype fields when tensors were cast."""
    config_updated = False
    for path in extra:
        try:
            if path.name == "config.json" and any(i.action == "cast" for i in plan.items):
                config_updated = _write_config(path, folder / path.name, fmt)
            elif path.is_dir():
                shutil.copytree(path, folder / path.name)
            else:
                shutil.copy2(path, folder / path.name)
        except OSError as exc:
            raise CheckpointError(f"{folder / path.name}: cannot copy ({exc.strerror}): free space or "
                                  "choose another output folder; nothing was kept") from exc
    return config_updated


def _write_config(source: Path, target: Path, fmt: NumberFormat) -> bool:
    """Copy config.json with its ``torch_dtype`` / ``dtype`` keys (where present) set to the format."""
    try:
        config = json.loads(source.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise CheckpointError(f"{source}: not valid JSON ({exc}): fix or remove it") from None
    sections = [config] + [v for k, v in config.items() if k.endswith("_config") and isinstance(v, dict)]
    updated = False
    for section in sections:
        for key in ("torch_dtype", "dtype"):
            if key in section:
                section[key], updated = dtype_name(fmt.torch_dtype), True
    _write_text(target, json.dumps(config, indent=2) + "\n")
    return updated


# ------------------------------------------------------------------------------------------- verify

def verify_output(plan: OutputPlan, folder: Path, caster: ChunkCaster) -> None:
    """Re-read every output tensor and check it equals the cast (or copy) of its source, bit for bit.

    Raises:
        CheckpointError: naming the first shard and tensor that differ.
    """
    check = bytearray(len(caster.raw))
    with ExitStack() as stack:
        sources = _open_sources(plan, stack)
        for shard in plan.shards:
            path = folder / shard.file
            header = read_header(path)
            expected = {n: (i.out_dtype, i.entry.shape) for i in shard.items for n in i.names}
            if {e.name: (e.dtype, e.shape) for e in header.tensors} != expected:
                raise CheckpointError(f"{path}: verification failed: its header does not list the "
                                      "tensors planned; nothing was kept")
            fd = os.open(path, os.O_RDONLY)
            stack.callback(os.close, fd)
            offsets = {e.name: e for e in header.tensors}
            for item in shard.items:
                _verify_item(item, sources[item.shard.path], fd,
                             header.data_start + offsets[item.names[0]].begin, path, caster, check)


def _verify_item(item: PlannedTensor, src_fd: int, out_fd: int, out_start: int, path: Path,
                 caster: ChunkCaster, check: bytearray) -> None:
    entry, start = item.entry, item.shard.data_start + item.entry.begin
    itemsize = entry.torch_dtype.itemsize if item.action == "cast" else 1
    step = caster.chunk_elements if item.action == "cast" else len(check)
    numel = entry.numel if item.action == "cast" else entry.nbytes
    out_itemsize = DTYPES[item.out_dtype].itemsize if item.action == "cast" else 1
    for first in range(0, numel, step):
        count = min(step, numel - first)
        source = memoryview(caster.raw)[:count * itemsize]
        read_exact(src_fd, source, start + first * itemsize, item.shard.path, entry.name)
        expected = caster.cast(entry.torch_dtype, count)[0] if item.action == "cast" else source
        actual = memoryview(check)[:count * out_itemsize]
        read_exact(out_fd, actual, out_start + first * out_itemsize, path, entry.name)
        if not torch.equal(torch.frombuffer(expected, dtype=torch.uint8),
                           torch.frombuffer(actual, dtype=torch.uint8)):
            raise CheckpointError(f"{path}: tensor {entry.name!r}: verification failed, the bytes "
                                  "written differ from the cast of the source; nothing was kept")
