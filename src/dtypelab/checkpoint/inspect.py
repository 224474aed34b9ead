"""What a safetensors checkpoint holds, read from its headers alone (no tensor data).

Checkpoint stage: a file or a folder (shards of an index, or plain ``*.safetensors`` files) is opened with
:func:`~dtypelab.checkpoint.safetensors_file.open_checkpoint`, which validates every header first.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from ..quant import DtypeSummary, dtype_name
from ..report import Table, TableMixin
from .safetensors_file import SafetensorsHeader, open_checkpoint


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
        stored_bytes: stored tensor bytes, tied tensors counted once (what a model's inspection calls
            its ``stored_bytes`` too: one key for one meaning).
        largest: the largest tensors, largest first.
        shared: groups of names stored as one tensor (tied weights).
        metadata: safetensors string metadata, merged over shards.
    """

    path: Path
    shards: list[ShardInfo]
    tensors: list[TensorRow]
    by_dtype: list[DtypeSummary]
    stored_bytes: int
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
        notes.append(f"total: {self.stored_bytes:,} bytes in {len(self.tensors)} tensors, "
                     f"{len(self.shards)} file(s) (tied tensors counted once)")
        notes += [f"shared: {', '.join(group)}" for group in self.shared]
        columns = ["name", "dtype", "shape", "numel", "nbytes", "shard"]  # the JSON's field names
        return Table(f"{self.path}: largest tensors", columns, rows, notes,
                     default_columns=["name", "dtype", "shape", "nbytes", "shard"])


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
