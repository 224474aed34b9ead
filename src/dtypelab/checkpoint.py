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
import shutil
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from .checkpoint_writer import (
    OutputPlan,
    ProgressCallback,
    copy_extra,
    parse_size,
    plan_output,
    verify_output,
    write_index,
    write_shards,
)
from .damage import ChunkCaster, TensorDamage, dtype_name, one_thread
from .errors import CheckpointError, InputError
from .formats import NumberFormat, get_format
from .inspection import DtypeSummary
from .report import Table, TableMixin, to_jsonable
from .safetensors_format import DTYPE_CODES, CheckpointSource, SafetensorsHeader, open_checkpoint
from .staging import StagedOutput

__all__ = ["CheckpointInspection", "ConversionResult", "ShardInfo", "TensorRow", "convert_checkpoint",
           "inspect_checkpoint", "open_checkpoint", "parse_size"]


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
        skipped_files: other weight files (pickles, stray safetensors) not copied: they would hold the
            weights again in the source precision.
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
    skipped_files: list[str]
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
        if self.skipped_files:
            notes.append(f"not copied (other weights, source precision): {', '.join(self.skipped_files)}")
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
    plan = plan_output(src, dst, dst_is_file, fmt, tuple(keep), parse_size(max_shard_size))
    with StagedOutput(dst, force) as staging, one_thread():
        extra, skipped = _extra_files(src)
        _check_free_space(staging.tmp, plan, extra)
        caster = ChunkCaster(fmt)
        damage = write_shards(plan, staging.tmp, caster, strict, progress)
        write_index(plan, staging.tmp)
        config_updated = copy_extra(src, extra, staging.tmp, fmt, plan)
        if verify:
            verify_output(plan, staging.tmp, caster)
        staging.commit(dst_is_file)
    written = sum(len(s.layout()[0]) + sum(i.out_nbytes for i in s.items) for s in plan.shards)
    return ConversionResult(src.path, dst, fmt.name, [s.file for s in plan.shards], plan.index_name,
                            damage, [p.name for p in extra], [p.name for p in skipped], config_updated,
                            sum(i.entry.nbytes for i in plan.items), written, verify)


def _target_format(to: str | NumberFormat) -> NumberFormat:
    fmt = get_format(to)
    if not fmt.raw_castable or fmt.torch_dtype not in DTYPE_CODES:
        raise InputError(f"convert writes floating formats stored as a torch dtype (fp32, fp16, bf16, "
                         f"fp8); {fmt.name!r} is not one (quantized int outputs are not supported yet): "
                         "pick one of those")
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


OTHER_WEIGHTS = ("*.safetensors", "pytorch_model*.bin", "pytorch_model*.bin.index.json", "tf_model.h5",
                 "flax_model*.msgpack")
"""Weight files outside the checkpoint being converted (pickles, a stray consolidated safetensors)."""


def _extra_files(src: CheckpointSource) -> tuple[list[Path], list[Path]]:
    """The folder's other files: those to copy, and other weight files to leave out."""
    if src.folder is None:
        return [], []
    weights = {s.path.name for s in src.shards} | {src.index_name}
    others = [p for p in sorted(src.folder.iterdir()) if p.name not in weights]
    skipped = [p for p in others if p.is_file() and any(fnmatch.fnmatch(p.name, w) for w in OTHER_WEIGHTS)]
    return [p for p in others if p not in skipped], skipped


def _check_free_space(folder: Path, plan: OutputPlan, extra: list[Path]) -> None:
    needed = sum(i.out_nbytes for i in plan.items) + sum(_tree_bytes(p) for p in extra)
    free = shutil.disk_usage(folder).free
    if needed > free:
        raise CheckpointError(f"{folder.parent}: {needed} bytes needed but only {free} free: free space "
                              "or choose another output folder")


def _tree_bytes(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size
