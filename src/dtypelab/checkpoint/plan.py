"""How a conversion lays out its output, decided from headers alone, before any byte is read.

Checkpoint stage. :func:`plan_output` says which tensors are cast, copied, kept or quantized (an
:class:`~dtypelab.quant.Action` each), how they are grouped into output files (resharding by size when
asked) and where each one's bytes go; :mod:`dtypelab.checkpoint.writer` then carries the plan out.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import InputError
from ..formats import NumberFormat
from ..naming import did_you_mean_names, tensor_matches
from ..quant import Action
from .layouts import StoredPart, stored_parts
from .safetensors_file import (
    DTYPE_CODES,
    DTYPES,
    INDEX_SUFFIX,
    CheckpointSource,
    SafetensorsHeader,
    TensorEntry,
    encode_header,
)

CAST_DTYPES = frozenset({"F16", "BF16", "F32", "F64"})
"""Source dtypes that are cast; integers, bool and already-quantized fp8 payloads are copied as they are."""


TIED_KEY = "tied_aliases"
"""Safetensors metadata key of the tied names a conversion stored once (see PlannedShard)."""


Output = tuple[tuple[str, ...], str, tuple[int, ...], int]
"""One tensor written: (names, safetensors dtype code, shape, bytes)."""


@dataclass(frozen=True)
class PlannedTensor:
    """One stored tensor to write: its names (tied ones share), source, action and output dtype code.

    ``action`` is an :class:`~dtypelab.quant.Action` (cast, copied, kept or quantized); a quantized item
    is the weight of the Linear layer ``module`` and writes ``parts`` (its compressed-tensors layout);
    ``transposed``: the source holds it (in, out), as GPT-2's Conv1D does, and it is stored as its
    (out, in) transpose.
    """

    names: tuple[str, ...]
    entry: TensorEntry
    shard: SafetensorsHeader
    action: str
    out_dtype: str
    parts: tuple[StoredPart, ...] = ()
    module: str = ""
    transposed: bool = False
    fmt: NumberFormat | None = None  # a quantized item's format

    @property
    def quantized_shape(self) -> tuple[int, int]:
        """(out, in) of a quantized weight: the source's shape, or its transpose."""
        rows, cols = self.entry.shape
        return (cols, rows) if self.transposed else (rows, cols)

    def outputs(self) -> list[Output]:
        """Every tensor this item writes, in the order a quantizer yields them."""
        if self.action == Action.QUANTIZED:
            return [((f"{self.module}.{p.suffix}",), DTYPE_CODES[p.dtype], p.shape, p.nbytes)
                    for p in self.parts]
        return [((self.names[0],), self.out_dtype, self.entry.shape,
                 self.entry.numel * DTYPES[self.out_dtype].itemsize)]

    @property
    def out_nbytes(self) -> int:
        return sum(output[3] for output in self.outputs())


Placed = tuple[PlannedTensor, int, int, int]
"""An output in its file: (item, index into ``item.outputs()``, begin, end) in data bytes."""


@dataclass
class PlannedShard:
    """One output file: outputs ordered by element size (keeps every tensor aligned), then offsets."""

    file: str
    items: list[PlannedTensor]
    metadata: dict[str, str]

    @property
    def header_metadata(self) -> dict[str, str]:
        """The source's metadata, plus ``tied_aliases`` (JSON: alias -> stored name) when tensors were
        tied: safetensors allows one name per byte range, so an alias is written as this note only."""
        aliases = {alias: item.names[0] for item in self.items for alias in item.names[1:]}
        return {**self.metadata, TIED_KEY: json.dumps(aliases)} if aliases else self.metadata

    def layout(self) -> tuple[bytes, list[Placed]]:
        outputs = [(item, index, out) for item in self.items for index, out in enumerate(item.outputs())]
        outputs.sort(key=lambda o: -DTYPES[o[2][1]].itemsize)  # stable: source order within a size
        placed, offset, entries = [], 0, []
        for item, index, (names, dtype, shape, nbytes) in outputs:
            placed.append((item, index, offset, offset + nbytes))
            entries += [(name, dtype, shape, offset, offset + nbytes) for name in names]
            offset += nbytes
        return encode_header(entries, self.header_metadata), placed


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


@dataclass(frozen=True)
class Quantization:
    """Which weights a conversion quantizes: ``layers`` maps a tensor name to its Linear module;
    ``transposed`` names the weights stored (in, out) (GPT-2's Conv1D); ``formats`` gives a tensor its
    own format (a mixed-precision plan), else ``fmt`` holds for all."""

    fmt: NumberFormat
    layers: dict[str, str]
    transposed: frozenset[str] = frozenset()
    formats: dict[str, NumberFormat] = field(default_factory=dict)

    def fmt_of(self, tensor: str) -> NumberFormat:
        return self.formats.get(tensor, self.fmt)

    @property
    def by_module(self) -> NumberFormat | dict[str, NumberFormat]:
        """The format, or module -> format for a plan (what ``quantization_config`` takes)."""
        if not self.formats:
            return self.fmt
        return {module: self.fmt_of(tensor) for tensor, module in self.layers.items()}


def _plan_item(names: tuple[str, ...], entry: TensorEntry, shard: SafetensorsHeader, target: str | None,
               kept: bool, quant: Quantization | None) -> PlannedTensor:
    if quant is not None and not kept and names[0] in quant.layers:
        transposed = names[0] in quant.transposed
        shape = tuple(reversed(entry.shape)) if transposed else entry.shape
        fmt = quant.fmt_of(names[0])
        parts = tuple(stored_parts(fmt, shape))
        return PlannedTensor(names, entry, shard, Action.QUANTIZED, DTYPE_CODES[parts[0].dtype], parts,
                             quant.layers[names[0]], transposed, fmt)
    action = _action(entry.dtype, target, kept)
    return PlannedTensor(names, entry, shard, action, target if action == Action.CAST else entry.dtype)


def _action(dtype: str, target: str | None, kept: bool) -> str:
    """``"kept"`` (a keep pattern matched), ``"cast"``, or ``"copied"`` (not cast: bit for bit)."""
    if kept:
        return Action.KEPT
    return Action.CAST if target and dtype in CAST_DTYPES and dtype != target else Action.COPIED


def plan_output(source: CheckpointSource, dst: Path, dst_is_file: bool, cast_to: NumberFormat | None,
                keep: tuple[str, ...], max_shard_bytes: int | None,
                quant: Quantization | None = None) -> OutputPlan:
    """Plan the output files: the source's own shards, or new ones of at most ``max_shard_bytes``.

    ``cast_to`` is the dtype floating tensors are cast to (None: copied as they are); ``quant`` names
    the weights stored quantized instead. Resharded files are named like transformers names them
    (``model-00001-of-00003.safetensors``, with ``model.safetensors.index.json``); a single one is
    ``model.safetensors`` without an index.
    """
    per_shard = _plan_tensors(source, cast_to, keep, quant)
    _check_unique_outputs([item for items in per_shard for item in items])
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


def _plan_tensors(source: CheckpointSource, cast_to: NumberFormat | None, keep: tuple[str, ...],
                  quant: Quantization | None) -> list[list[PlannedTensor]]:
    """Per source shard, the stored tensors to write; tied names grouped into one item.

    Names tie when they hold the same bytes in the same shape; an alias of the same bytes in another
    shape (a view: ``[6]`` over a ``[2, 3]``) is an item of its own, written in its own shape (a
    safetensors file has no views, and ``tied_aliases`` records names only)."""
    target, matched, per_shard = DTYPE_CODES[cast_to.torch_dtype] if cast_to else None, set(), []
    for shard in source.shards:
        groups: dict[tuple | str, list[TensorEntry]] = {}
        for entry in shard.tensors:
            key = (entry.begin, entry.end, entry.shape) if entry.nbytes else entry.name
            groups.setdefault(key, []).append(entry)
        items = []
        for entries in groups.values():
            names = tuple(e.name for e in entries)
            hits = {p for p in keep for n in names if tensor_matches(n, p)}
            matched |= hits
            items.append(_plan_item(names, entries[0], shard, target, bool(hits), quant))
        per_shard.append(items)
    for pattern in keep:
        if pattern not in matched:
            names = [e.name for shard in source.shards for e in shard.tensors]
            names += [n.rsplit(".", 1)[0] for n in names if "." in n]  # the modules holding them
            raise InputError(f"keep pattern {pattern!r} matches no tensor or module of the checkpoint"
                             f"{did_you_mean_names(pattern, names)}: check the names with `dtypelab inspect` "
                             "(a class name such as LayerNorm needs "
                             "the model: give module names or globs, e.g. '*norm*')")
    return per_shard


def _check_unique_outputs(items: list[PlannedTensor]) -> None:
    """Refuse two outputs of one name (a source tensor already called ``x.weight_scale``, say): the
    file would list one of them at the other's bytes."""
    written: dict[str, PlannedTensor] = {}
    for item in items:
        for names, *_ in item.outputs():
            for name in names:
                if name in written:
                    first = written[name]
                    layer = first if first.action == Action.QUANTIZED else item
                    raise InputError(f"tensor {name!r} would be written twice (from {first.names[0]!r} and "
                                     f"{item.names[0]!r}): keep the layer dense with --keep "
                                     f"{layer.names[0]!r}, or remove the stray tensor from the source")
                written[name] = item


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
