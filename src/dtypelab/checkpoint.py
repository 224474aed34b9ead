"""Safetensors checkpoints: inspect them from headers alone, convert them in constant memory.

A checkpoint is one ``.safetensors`` file or a Hugging Face folder (shards listed by a
``*.safetensors.index.json``, or plain ``*.safetensors`` files). :func:`inspect_checkpoint` reads headers
only. :func:`convert_checkpoint` streams every tensor through reused buffers (see
:mod:`dtypelab.damage`), so its memory does not grow with the checkpoint; it writes into a temporary
folder beside the destination and renames it into place only when complete, so a run that fails or is
killed leaves no destination behind (and the next run removes its leftovers).
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shutil
from collections.abc import Callable, Iterable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .damage import ChunkCaster, TensorDamage, dtype_name, one_thread
from .errors import CheckpointError, DamageError, InputError
from .formats import NumberFormat, get_format
from .inspection import DtypeSummary
from .report import Table, TableMixin, to_jsonable
from .safetensors_format import (
    DTYPE_CODES,
    DTYPES,
    INDEX_SUFFIX,
    CheckpointSource,
    SafetensorsHeader,
    TensorEntry,
    copy_range,
    encode_header,
    open_checkpoint,
    read_exact,
    read_header,
    write_all,
)
from .staging import StagedOutput

CAST_DTYPES = frozenset({"F16", "BF16", "F32", "F64"})
"""Source dtypes that are cast; integers, bool and already-quantized fp8 payloads are copied as they are."""

ProgressCallback = Callable[[int, int], None]
"""Called as ``progress(bytes_done, bytes_total)`` while tensor data streams."""


# ------------------------------------------------------------------------------------------ inspect

@dataclass(frozen=True)
class TensorRow:
    """One tensor of a checkpoint.

    ``dtype`` is the torch name (``"bfloat16"``), ``nbytes`` its stored size in bytes; ``shares_with``
    names the tensor listed earlier whose bytes it shares (tied weights, counted once).
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    numel: int
    nbytes: int
    shard: str
    shares_with: str | None = None


@dataclass(frozen=True)
class ShardInfo:
    """One file of a checkpoint: sizes in bytes."""

    file: str
    file_bytes: int
    header_bytes: int
    tensor_count: int


@dataclass
class CheckpointInspection(TableMixin):
    """A checkpoint described from its headers alone; renders as a table (text, HTML, JSON).

    Args:
        path: the file or folder inspected.
        shards: one row per file.
        tensors: one row per tensor name, in shard then data order.
        by_dtype: tensors, elements and bytes per dtype, tied tensors counted once.
        total_bytes: stored tensor bytes, tied tensors counted once.
        largest: the largest tensors, largest first.
        shared: groups of names stored as one tensor (tied weights).
        metadata: safetensors string metadata, merged over shards.
    """

    path: Path
    shards: list[ShardInfo]
    tensors: list[TensorRow]
    by_dtype: list[DtypeSummary]
    total_bytes: int
    largest: list[TensorRow]
    shared: list[tuple[str, ...]]
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def bytes_by_dtype(self) -> dict[str, int]:
        return {summary.dtype: summary.nbytes for summary in self.by_dtype}

    def to_table(self) -> Table:
        rows = [[t.name, t.dtype, list(t.shape), t.numel, t.nbytes, t.shard] for t in self.largest]
        notes = [f"{s.dtype}: {s.tensors} tensors, {s.numel:,} elements, {s.nbytes:,} bytes"
                 for s in self.by_dtype]
        notes.append(f"total: {self.total_bytes:,} bytes in {len(self.tensors)} tensors, "
                     f"{len(self.shards)} file(s) (tied tensors counted once)")
        notes += [f"shared: {', '.join(group)}" for group in self.shared]
        return Table(f"{self.path}: largest tensors", ["name", "dtype", "shape", "numel", "bytes", "file"],
                     rows, notes)


def inspect_checkpoint(path: str | os.PathLike, largest_count: int = 10) -> CheckpointInspection:
    """Describe a ``.safetensors`` file or sharded folder reading only its headers.

    Args:
        path: a ``.safetensors`` file or a model folder.
        largest_count: how many of the largest tensors to list in ``largest``.

    Example:
        >>> inspect_checkpoint("model-folder").bytes_by_dtype  # doctest: +SKIP
        {'float32': 90419712}
    """
    source = open_checkpoint(path)
    rows = [row for shard in source.shards for row in _shard_rows(shard)]
    totals: dict[str, list[int]] = {}
    for row in rows:
        if row.shares_with is None:
            count = totals.setdefault(row.dtype, [0, 0, 0])
            count[0], count[1], count[2] = count[0] + 1, count[1] + row.numel, count[2] + row.nbytes
    by_dtype = [DtypeSummary(dtype, *counts) for dtype, counts in totals.items()]
    shards = [ShardInfo(s.path.name, s.file_bytes, s.header_bytes, len(s.tensors)) for s in source.shards]
    largest = sorted(rows, key=lambda r: -r.nbytes)[:largest_count]
    shared = [group for shard in source.shards for group in shard.shared_groups()]
    metadata = {k: v for shard in source.shards for k, v in shard.metadata.items()}
    return CheckpointInspection(Path(path), shards, rows, by_dtype, sum(s.nbytes for s in by_dtype),
                                largest, shared, metadata)


def _shard_rows(shard: SafetensorsHeader) -> list[TensorRow]:
    owners: dict[tuple[int, int], str] = {}
    rows = []
    for entry in shard.tensors:
        owner = owners.setdefault((entry.begin, entry.end), entry.name) if entry.nbytes else entry.name
        rows.append(TensorRow(entry.name, dtype_name(entry.torch_dtype), entry.shape, entry.numel,
                              entry.nbytes, shard.path.name, None if owner == entry.name else owner))
    return rows


# -------------------------------------------------------------------------------------------- plan

@dataclass(frozen=True)
class _Item:
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
class _OutShard:
    """One output file: items ordered by element size (keeps every tensor aligned), then offsets."""

    file: str
    items: list[_Item]
    metadata: dict[str, str]

    def layout(self) -> tuple[bytes, list[tuple[_Item, int, int]]]:
        placed, offset = [], 0
        for item in sorted(self.items, key=lambda i: -DTYPES[i.out_dtype].itemsize):
            placed.append((item, offset, offset + item.out_nbytes))
            offset += item.out_nbytes
        entries = [(name, item.out_dtype, item.entry.shape, begin, end)
                   for item, begin, end in placed for name in item.names]
        return encode_header(entries, self.metadata), placed


@dataclass
class _Plan:
    shards: list[_OutShard]
    index_name: str | None
    index_metadata: dict

    @property
    def items(self) -> list[_Item]:
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


def _plan_items(source: CheckpointSource, fmt: NumberFormat, keep: tuple[str, ...]) -> list[list[_Item]]:
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
            action = "kept" if hits else "cast" if entries[0].dtype in CAST_DTYPES else "copied"
            action = "copied" if action == "cast" and entries[0].dtype == target else action
            items.append(_Item(names, entries[0], shard, action,
                               target if action == "cast" else entries[0].dtype))
        per_shard.append(items)
    for pattern in keep:
        if pattern not in matched:
            raise InputError(f"keep pattern {pattern!r} matches no tensor: check the names with "
                             "`dtypelab inspect`")
    return per_shard


def _plan(source: CheckpointSource, dst: Path, dst_is_file: bool, fmt: NumberFormat,
          keep: tuple[str, ...], max_shard_bytes: int | None) -> _Plan:
    per_shard = _plan_items(source, fmt, keep)
    metadata = {k: v for shard in source.shards for k, v in shard.metadata.items()}
    if max_shard_bytes is None:
        names = [dst.name if dst_is_file else s.path.name for s in source.shards]
        shards = [_OutShard(n, items, s.metadata)
                  for n, items, s in zip(names, per_shard, source.shards, strict=True)]
        return _Plan(shards, source.index_name, source.index_metadata)
    groups: list[list[_Item]] = [[]]
    for item in (item for items in per_shard for item in items):
        if groups[-1] and sum(i.out_nbytes for i in groups[-1]) + item.out_nbytes > max_shard_bytes:
            groups.append([])
        groups[-1].append(item)
    prefix = source.index_name.removesuffix(INDEX_SUFFIX) if source.index_name else "model"
    if len(groups) == 1:
        name = dst.name if dst_is_file else f"{prefix}.safetensors"
        return _Plan([_OutShard(name, groups[0], metadata)], None, source.index_metadata)
    if dst_is_file:
        raise InputError(f"{dst}: {len(groups)} shards of at most {max_shard_bytes} bytes need a folder: "
                         "give -o a folder name")
    count = len(groups)
    shards = [_OutShard(f"{prefix}-{i:05d}-of-{count:05d}.safetensors", g, metadata)
              for i, g in enumerate(groups, 1)]
    return _Plan(shards, prefix + INDEX_SUFFIX, source.index_metadata)


# ------------------------------------------------------------------------------------------ convert

@dataclass
class ConversionResult(TableMixin):
    """What a conversion wrote and what it did to every tensor; renders as a table (text, HTML, JSON).

    Args:
        source: the checkpoint read.
        destination: the file or folder written.
        format: the target format's name.
        shards: output file names.
        index_file: the index written, if any.
        tensors: damage per stored tensor, in output order.
        copied_files: other files of the folder copied as they are.
        config_updated: whether config.json's dtype fields were rewritten.
        bytes_read: tensor bytes read from the source.
        bytes_written: bytes of the safetensors files written, headers included.
        verified: whether the output was re-read and checked bit for bit.
    """

    source: Path
    destination: Path
    format: str
    shards: list[str]
    index_file: str | None
    tensors: list[TensorDamage]
    copied_files: list[str]
    config_updated: bool
    bytes_read: int
    bytes_written: int
    verified: bool

    @property
    def total(self) -> TensorDamage:
        """All tensors' counts added up (max_rel_error is the largest of any)."""
        total = TensorDamage("total", "", self.format, "total", sum(t.numel for t in self.tensors))
        for tensor in self.tensors:
            total = total.merged(tensor)
        return total

    def worst(self, count: int = 5) -> list[TensorDamage]:
        """The most damaged cast tensors: lost values first, then subnormals, then relative error."""
        cast = [t for t in self.tensors if t.action == "cast"]
        return sorted(cast, key=lambda t: (-t.lost_values, -t.subnormal, -t.max_rel_error))[:count]

    def to_table(self) -> Table:
        columns = ["tensor", "from", "to", "numel", "overflowed", "flushed_to_zero", "subnormal",
                   "max_rel_error"]
        rows = [[t.name, t.source_dtype, t.output_dtype, t.numel, t.overflowed, t.flushed_to_zero,
                 t.subnormal, t.max_rel_error] for t in [*self.worst(), self.total]]
        actions = {a: sum(t.action == a for t in self.tensors) for a in ("cast", "copied", "kept")}
        notes = [f"{self.source} -> {self.destination}: {', '.join(f'{n} {a}' for a, n in actions.items())}"
                 f"; {self.bytes_read:,} bytes read, {self.bytes_written:,} written in "
                 f"{len(self.shards)} file(s)" + (f" + {self.index_file}" if self.index_file else ""),
                 f"copied {len(self.copied_files)} other file(s); config dtype updated: "
                 f"{self.config_updated}; verified bit for bit: {self.verified}"]
        return Table(f"Conversion to {self.format}: most damaged tensors", columns, rows, notes)

    def to_json(self) -> str:
        """The full report (every tensor) that ``--report FILE`` writes."""
        return json.dumps({**to_jsonable(self), "total": to_jsonable(self.total)}, indent=2)


def convert_checkpoint(source: str | os.PathLike, destination: str | os.PathLike,
                       to: str | NumberFormat, *, keep: Iterable[str] = (),
                       max_shard_size: str | int | None = None, force: bool = False,
                       verify: bool = False, strict: bool = False,
                       progress: ProgressCallback | None = None) -> ConversionResult:
    """Convert a safetensors file or folder to a floating format, tensor by tensor.

    Floating tensors (fp16/bf16/fp32/fp64) are cast; integer, bool and fp8 tensors, tensors already in
    the target dtype and those matching ``keep`` (exact names or globs) are copied bit for bit.

    Args:
        source: a ``.safetensors`` file or model folder; opened read-only.
        destination: a folder, or a ``.safetensors`` file name when ``source`` is a file.
        to: target format name (``"bf16"``) or :class:`NumberFormat`.
        keep: tensor names or globs (``"*norm*"``) left as they are.
        max_shard_size: reshard into files of at most this many bytes (``"5GB"``); ``None`` keeps
            the source's shards.
        force: replace an existing destination.
        verify: re-read the output and check every tensor against its source, bit for bit.
        strict: raise :class:`DamageError` (and write nothing) if any value overflows or flushes.
        progress: called with ``(bytes_done, bytes_total)`` as tensor data streams.

    Returns:
        A :class:`ConversionResult` with the damage per tensor.
    """
    fmt = _target_format(to)
    src = open_checkpoint(source)
    dst = Path(destination)
    dst_is_file = _check_destination(src, dst)
    plan = _plan(src, dst, dst_is_file, fmt, tuple(keep), parse_size(max_shard_size))
    with StagedOutput(dst, force) as staging, one_thread():
        extra = [] if src.folder is None else _extra_files(src)
        _check_free_space(staging.tmp, plan, extra)
        caster = ChunkCaster(fmt)
        damage = _write_shards(plan, staging.tmp, caster, strict, progress)
        _write_index(plan, staging.tmp)
        config_updated = _copy_extra(src, extra, staging.tmp, fmt, plan)
        if verify:
            verify_output(plan, staging.tmp, caster)
        staging.commit(dst_is_file)
    written = sum(len(s.layout()[0]) + sum(i.out_nbytes for i in s.items) for s in plan.shards)
    return ConversionResult(src.path, dst, fmt.name, [s.file for s in plan.shards], plan.index_name,
                            damage, [p.name for p in extra], config_updated,
                            sum(i.entry.nbytes for i in plan.items), written, verify)


def _target_format(to: str | NumberFormat) -> NumberFormat:
    fmt = get_format(to)
    if not fmt.is_floating_point or fmt.torch_dtype not in DTYPE_CODES:
        raise InputError(f"convert writes floating formats stored as a torch dtype (fp32, fp16, bf16, "
                         f"fp8); {fmt.name!r} is not one: pick one of those")
    return fmt


def _check_destination(src: CheckpointSource, dst: Path) -> bool:
    """Refuse a destination inside the source (or holding it); return whether it is a single file."""
    src_root, target = src.path.resolve(), dst.resolve()
    if target == src_root or src_root in target.parents or target in src_root.parents:
        raise InputError(f"{dst}: the output must be outside {src.path} and not contain it: "
                         "choose another -o")
    if dst.suffix == ".safetensors" and src.folder is not None:
        raise InputError(f"{dst}: a folder converts to a folder: give -o a folder name")
    return src.folder is None and dst.suffix == ".safetensors"


def _extra_files(src: CheckpointSource) -> list[Path]:
    weights = {s.path.name for s in src.shards} | {src.index_name}
    return [p for p in sorted(src.folder.iterdir()) if p.name not in weights]


def _check_free_space(folder: Path, plan: _Plan, extra: list[Path]) -> None:
    needed = sum(i.out_nbytes for i in plan.items) + sum(_tree_bytes(p) for p in extra)
    free = shutil.disk_usage(folder).free
    if needed > free:
        raise CheckpointError(f"{folder.parent}: {needed} bytes needed but only {free} free: free space "
                              "or choose another output folder")


def _tree_bytes(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size


def _write_shards(plan: _Plan, folder: Path, caster: ChunkCaster, strict: bool,
                  progress: ProgressCallback | None) -> list[TensorDamage]:
    total, done, damage = sum(i.entry.nbytes for i in plan.items), [0], []

    def tick(count: int) -> None:
        done[0] += count
        if progress is not None:
            progress(done[0], total)

    with ExitStack() as stack:
        sources = _open_sources(plan, stack)
        for shard in plan.shards:
            path = folder / shard.file
            header, placed = shard.layout()
            fd = _create(path)
            stack.callback(os.close, fd)
            write_all(fd, memoryview(header), path)
            for item, _, _ in placed:
                result = _stream_item(item, sources[item.shard.path], fd, path, caster, tick)
                if strict and result.lost_values:
                    raise _damage_error(result, caster.fmt)
                damage.append(result)
    return damage


def _open_sources(plan: _Plan, stack: ExitStack) -> dict[Path, int]:
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


def _stream_item(item: _Item, src_fd: int, dst_fd: int, path: Path, caster: ChunkCaster,
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


def _write_index(plan: _Plan, folder: Path) -> None:
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


def _copy_extra(src: CheckpointSource, extra: list[Path], folder: Path, fmt: NumberFormat,
                plan: _Plan) -> bool:
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

def verify_output(plan: _Plan, folder: Path, caster: ChunkCaster) -> None:
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


def _verify_item(item: _Item, src_fd: int, out_fd: int, out_start: int, path: Path,
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
