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

from .compressed import WHOLE_TENSOR_PARTS, StoredPart, stored_parts, to_parts
from .damage import ChunkCaster, ChunkQuantizer, TensorDamage, dtype_name
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
    pwrite_all,
    read_exact,
    read_header,
    write_all,
)

CAST_DTYPES = frozenset({"F16", "BF16", "F32", "F64"})
"""Source dtypes that are cast; integers, bool and already-quantized fp8 payloads are copied as they are."""

ProgressCallback = Callable[[int, int], None]
"""Called as ``progress(bytes_done, bytes_total)`` while tensor data streams."""


TIED_KEY = "tied_aliases"
"""Safetensors metadata key of the tied names a conversion stored once (see PlannedShard)."""

Output = tuple[tuple[str, ...], str, tuple[int, ...], int]
"""One tensor written: (names, safetensors dtype code, shape, bytes)."""


@dataclass(frozen=True)
class PlannedTensor:
    """One stored tensor to write: its names (tied ones share), source, action and output dtype code.

    ``action`` is ``"cast"``, ``"copied"``, ``"kept"`` or ``"quantized"``; a quantized item is the
    weight of the Linear layer ``module`` and writes ``parts`` (its compressed-tensors layout).
    """

    names: tuple[str, ...]
    entry: TensorEntry
    shard: SafetensorsHeader
    action: str
    out_dtype: str
    parts: tuple[StoredPart, ...] = ()
    module: str = ""

    def outputs(self) -> list[Output]:
        """Every tensor this item writes, in the order a quantizer yields them."""
        if self.action == "quantized":
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
    """Which weights a conversion quantizes: ``layers`` maps a tensor name to its Linear module."""

    fmt: NumberFormat
    layers: dict[str, str]


def _plan_tensors(source: CheckpointSource, cast_to: NumberFormat | None, keep: tuple[str, ...],
                  quant: Quantization | None) -> list[list[PlannedTensor]]:
    """Per source shard, the stored tensors to write; tied names grouped into one item."""
    target, matched, per_shard = DTYPE_CODES[cast_to.torch_dtype] if cast_to else None, set(), []
    for shard in source.shards:
        groups: dict[tuple[int, int] | str, list[TensorEntry]] = {}
        for entry in shard.tensors:
            groups.setdefault((entry.begin, entry.end) if entry.nbytes else entry.name, []).append(entry)
        items = []
        for entries in groups.values():
            names = tuple(e.name for e in entries)
            hits = {p for p in keep for n in names if keep_matches(n, p)}
            matched |= hits
            items.append(_plan_item(names, entries[0], shard, target, bool(hits), quant))
        per_shard.append(items)
    for pattern in keep:
        if pattern not in matched:
            raise InputError(f"keep pattern {pattern!r} matches no tensor: check the names with "
                             "`dtypelab inspect`")
    return per_shard


def keep_matches(name: str, pattern: str) -> bool:
    """A ``--keep`` pattern: the exact tensor name or a glob (case-sensitive, ``*norm*``)."""
    return name == pattern or fnmatch.fnmatchcase(name, pattern)


def _plan_item(names: tuple[str, ...], entry: TensorEntry, shard: SafetensorsHeader, target: str | None,
               kept: bool, quant: Quantization | None) -> PlannedTensor:
    if quant is not None and not kept and names[0] in quant.layers:
        parts = tuple(stored_parts(quant.fmt, entry.shape))
        return PlannedTensor(names, entry, shard, "quantized", DTYPE_CODES[parts[0].dtype], parts,
                             quant.layers[names[0]])
    action = _action(entry.dtype, target, kept)
    return PlannedTensor(names, entry, shard, action, target if action == "cast" else entry.dtype)


def _action(dtype: str, target: str | None, kept: bool) -> str:
    """``"kept"`` (a keep pattern matched), ``"cast"``, or ``"copied"`` (not cast: bit for bit)."""
    if kept:
        return "kept"
    return "cast" if target and dtype in CAST_DTYPES and dtype != target else "copied"


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


def _check_unique_outputs(items: list[PlannedTensor]) -> None:
    """Refuse two outputs of one name (a source tensor already called ``x.weight_scale``, say): the
    file would list one of them at the other's bytes."""
    written: dict[str, PlannedTensor] = {}
    for item in items:
        for names, *_ in item.outputs():
            for name in names:
                if name in written:
                    first = written[name]
                    layer = first if first.action == "quantized" else item
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


def write_shards(plan: OutputPlan, folder: Path, caster: ChunkCaster, strict: bool,
                 progress: ProgressCallback | None,
                 quantizer: ChunkQuantizer | None = None) -> list[TensorDamage]:
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
            writer = _ShardWriter(folder / shard.file, sources, caster, quantizer, tick)
            damage += writer.write(shard, strict)
    return damage


class _ShardWriter:
    """Writes one output file: the header, then every output at its planned offset."""

    def __init__(self, path: Path, sources: dict[Path, int], caster: ChunkCaster,
                 quantizer: ChunkQuantizer | None, tick: Callable[[int], None]):
        self.path, self.sources, self.tick = path, sources, tick
        self.caster, self.quantizer = caster, quantizer

    def write(self, shard: PlannedShard, strict: bool) -> list[TensorDamage]:
        header, placed = shard.layout()
        starts = part_offsets(placed, len(header))
        fd, damage = _create(self.path), []
        try:
            write_all(fd, memoryview(header), self.path)
            for position, (item, index, begin, _) in enumerate(placed):
                if position + 1 < len(placed):
                    _prefetch(placed[position + 1][0], self.sources)
                if index:  # a quantized item's later parts: written with its first
                    continue
                result = self._write_item(item, fd, len(header) + begin, starts)
                if strict and result.lost_values:
                    raise _damage_error(result, self.quantizer.fmt if self.quantizer and
                                        item.action == "quantized" else self.caster.fmt)
                damage.append(result)
        finally:
            os.close(fd)
        return damage

    def _write_item(self, item: PlannedTensor, fd: int, start: int,
                    starts: dict[int, list[int]]) -> TensorDamage:
        src_fd = self.sources[item.shard.path]
        if item.action != "quantized":
            os.lseek(fd, start, os.SEEK_SET)  # sequential unless quantized parts sit in between
            return _stream_item(item, src_fd, fd, self.path, self.caster, self.tick)
        positions, result = list(starts[id(item)]), _quantized_damage(item, self.quantizer)
        for chunk, damage, nbytes in quantized_chunks(item, src_fd, self.quantizer):
            for part, data in enumerate(chunk):
                if data is not None:
                    pwrite_all(fd, data, positions[part], self.path)
                    positions[part] += len(data)
            result = result.merged(damage)
            self.tick(nbytes)
        return result


def part_offsets(placed: list[Placed], data_start: int) -> dict[int, list[int]]:
    """File offset of every part of each quantized item (keyed by ``id(item)``), in part order."""
    starts: dict[int, dict[int, int]] = {}
    for item, index, begin, _ in placed:
        if item.action == "quantized":
            starts.setdefault(id(item), {})[index] = data_start + begin
    return {key: [found[i] for i in sorted(found)] for key, found in starts.items()}


def _quantized_damage(item: PlannedTensor, quantizer: ChunkQuantizer) -> TensorDamage:
    entry = item.entry
    return TensorDamage(entry.name, dtype_name(entry.torch_dtype), quantizer.fmt.name, "quantized",
                        entry.numel, aliases=item.names[1:])


def quantized_chunks(item: PlannedTensor, src_fd: int, quantizer: ChunkQuantizer):
    """Quantize ``item``'s rows chunk by chunk: yield (bytes per part, or None where a whole-tensor
    part was already given; the chunk's damage; source bytes read)."""
    entry = item.entry
    rows, cols = entry.shape
    row_bytes, start = cols * entry.torch_dtype.itemsize, item.shard.data_start + entry.begin
    for first, count in quantizer.row_chunks(rows, cols):
        view = quantizer.buffer(count * row_bytes)
        read_exact(src_fd, view, start + first * row_bytes, item.shard.path, entry.name)
        try:
            qt, damage = quantizer.quantize(entry.torch_dtype, count, cols)
        except InputError as exc:
            raise InputError(f"tensor {entry.name!r}: {exc}; or keep the layer dense with "
                             f"--keep {entry.name!r}") from None
        parts = to_parts(qt, (rows, cols))
        yield [None if first and suffix in WHOLE_TENSOR_PARTS else tensor_bytes(tensor)
               for suffix, tensor in parts.items()], damage, len(view)


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The raw little-endian bytes of a tensor (any dtype, float8 included)."""
    return memoryview(tensor.contiguous().reshape(-1).view(torch.uint8).numpy())


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
    lost = (f"{damage.overflowed} values are clamped beyond what {fmt.name}'s codes reach"
            if damage.action == "quantized" else
            f"{damage.overflowed} values overflow and {damage.flushed_to_zero} flush to zero in {fmt.name}")
    return DamageError(f"tensor {damage.name!r}: {lost}; nothing was written (--strict): keep it with "
                       f"--keep {damage.name!r} or drop --strict")


def write_index(plan: OutputPlan, folder: Path) -> None:
    """The ``*.safetensors.index.json`` of a sharded output: every tensor name -> its file, and the
    source index's metadata with ``total_size`` (tensor bytes) recomputed."""
    if plan.index_name is None:
        return
    weight_map = {name: shard.file for shard in plan.shards for item in shard.items
                  for names, *_ in item.outputs() for name in names}
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


def copy_extra(src: CheckpointSource, extra: list[Path], folder: Path, cast_to: NumberFormat | None,
               plan: OutputPlan, quantization_config: dict | None = None) -> bool:
    """Copy the folder's other files (``extra``, paths inside ``src.folder``); rewrite config.json's dtype
    fields when tensors were cast, and
    add ``quantization_config`` when weights were quantized."""
    config_updated = False
    cast = cast_to if any(i.action == "cast" for i in plan.items) else None
    for path in extra:
        target = folder / path.relative_to(src.folder)
        try:
            if path.parent == src.folder and path.name == "config.json" and (cast or quantization_config):
                config_updated = _write_config(path, target, cast, quantization_config)
            else:
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, target)
        except OSError as exc:
            raise CheckpointError(f"{path}: cannot copy ({exc.strerror}): free space or choose another "
                                  "output folder; nothing was kept") from exc
    return config_updated


def read_config(path: Path) -> dict:
    """A config.json as a dict, or a one-line CheckpointError."""
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc}): fix or remove it") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: not a JSON object: fix or remove it")
    return config


def _write_config(source: Path, target: Path, cast: NumberFormat | None,
                  quantization_config: dict | None) -> bool:
    """Copy config.json with its ``torch_dtype`` / ``dtype`` keys (where present) set to the cast's
    dtype, and the quantization config added."""
    config = read_config(source)
    sections = [config] + [v for k, v in config.items() if k.endswith("_config") and isinstance(v, dict)]
    updated = False
    for section in sections if cast else []:
        for key in ("torch_dtype", "dtype"):
            if key in section:
                section[key], updated = dtype_name(cast.torch_dtype), True
    if quantization_config:
        config["quantization_config"], updated = quantization_config, True
    _write_text(target, json.dumps(config, indent=2) + "\n")
    return updated


# ------------------------------------------------------------------------------------------- verify

def verify_output(plan: OutputPlan, folder: Path, caster: ChunkCaster,
                  quantizer: ChunkQuantizer | None = None) -> None:
    """Re-read every output tensor and check it equals the cast, copy or quantization of its source,
    bit for bit.

    Raises:
        CheckpointError: naming the first shard and tensor that differ.
    """
    check = bytearray(len(caster.raw))
    with ExitStack() as stack:
        sources = _open_sources(plan, stack)
        for shard in plan.shards:
            path = folder / shard.file
            header = _verified_header(path, shard)
            fd = os.open(path, os.O_RDONLY)
            stack.callback(os.close, fd)
            offsets = {e.name: header.data_start + e.begin for e in header.tensors}
            for item in shard.items:
                starts = [offsets[names[0]] for names, *_ in item.outputs()]
                if item.action == "quantized":
                    _verify_quantized(item, sources[item.shard.path], fd, starts, path, quantizer)
                else:
                    _verify_item(item, sources[item.shard.path], fd, starts[0], path, caster, check)


def _verified_header(path: Path, shard: PlannedShard) -> SafetensorsHeader:
    """The output file's header, checked to list exactly the planned tensors."""
    header = read_header(path)
    expected = {n: (dtype, tuple(shape)) for i in shard.items for names, dtype, shape, _ in i.outputs()
                for n in names}
    if {e.name: (e.dtype, tuple(e.shape)) for e in header.tensors} != expected:
        raise CheckpointError(f"{path}: verification failed: its header does not list the "
                              "tensors planned; nothing was kept")
    return header


def _verify_quantized(item: PlannedTensor, src_fd: int, out_fd: int, starts: list[int], path: Path,
                      quantizer: ChunkQuantizer) -> None:
    positions = list(starts)
    for chunk, _, _ in quantized_chunks(item, src_fd, quantizer):
        for part, expected in enumerate(chunk):
            if expected is None:
                continue
            actual = bytearray(len(expected))
            read_exact(out_fd, memoryview(actual), positions[part], path, item.entry.name)
            if actual != expected:
                raise _verify_error(path, item.outputs()[part][0][0], "quantization")
            positions[part] += len(expected)


def _verify_error(path: Path, name: str, operation: str) -> CheckpointError:
    return CheckpointError(f"{path}: tensor {name!r}: verification failed, the bytes written differ from "
                           f"the {operation} of the source; nothing was kept")


def _verify_item(item: PlannedTensor, src_fd: int, out_fd: int, out_start: int, path: Path,
                 caster: ChunkCaster, check: bytearray) -> None:
    """Compare one cast (chunk by chunk) or copied (byte range) tensor with its source's bytes."""
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
            raise _verify_error(path, entry.name, "cast")
