"""How a conversion writes its output: stream the planned tensors, write index and config, verify.

Checkpoint stage. :func:`write_shards` streams every tensor of an
:class:`~dtypelab.checkpoint.plan.OutputPlan` from its source file into its output file through one
:class:`~dtypelab.checkpoint.streaming.ChunkCaster`'s reused buffers (or a ChunkQuantizer's, row chunk by
row chunk, into the compressed-tensors parts); once a tensor is past ``--strict``'s limits it only counts
the rest, so the refusal's report is complete; :func:`verify_output` re-reads the result.

Given an :class:`~dtypelab.executor.Executor` (``--workers N``, ``--ray``), each output shard is one task:
every worker opens the sources itself and writes its shards into the same staging folder (on a cluster,
a filesystem the workers share), with the same code as in-process, so the bytes are the same.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import CheckpointError, InputError
from ..executor import Executor, InProcess, TaskFailure
from ..formats import NumberFormat
from ..progress import Progress
from ..quant import Action, TensorDamage, dtype_name
from .layouts import WHOLE_TENSOR_PARTS, to_parts
from .plan import OutputPlan, Placed, PlannedShard, PlannedTensor
from .safetensors_file import (
    DTYPES,
    CheckpointSource,
    SafetensorsHeader,
    copy_range,
    pwrite_all,
    read_exact,
    read_header,
    write_all,
)
from .streaming import ChunkCaster, ChunkQuantizer


def write_shards(plan: OutputPlan, folder: Path, caster: ChunkCaster,
                 refuses: Callable[[TensorDamage], bool] | None, progress: Progress | None,
                 quantizer: ChunkQuantizer | None = None,
                 executor: Executor | None = None, verify: bool = False) -> list[TensorDamage]:
    """Write every planned shard into ``folder``; return each stored tensor's damage, in output order.

    Args:
        refuses: under ``--strict``, whether a tensor's damage is past the limits. From the first such
            tensor on, nothing more is written (the output will be thrown away) but every remaining
            tensor is still read and counted, so the damage returned is the whole conversion's (on an
            executor: from there on within that shard; the caller decides over all of it).
        progress: told the source bytes streamed: tensor by tensor in this process, shard by shard
            (as each finishes) on an executor.
        executor: run each shard as a task there (None, or :class:`~dtypelab.executor.InProcess`: this
            process's loop).
        verify: re-read what was written and check it bit for bit (:func:`verify_output`): on an
            executor, each shard by the worker that wrote it, so a cluster's verification is spread as
            its writing is; skipped once ``refuses`` stopped the writing (the output is thrown away).
    Raises:
        CheckpointError: on an executor, a shard that failed twice (or whose worker died), named; a
            shard's own dtypelab error (a tensor a format cannot hold) is raised as it is.
    """
    if executor is not None and not isinstance(executor, InProcess):
        return _write_shards_on(executor, plan, folder, caster, refuses, progress, quantizer, verify)
    damage: list[TensorDamage] = []
    with ExitStack() as stack:
        writer = _ShardWriter(_open_sources(plan, stack), caster, quantizer, progress, refuses)
        for shard in plan.shards:
            damage += writer.write(shard, folder / shard.file)
    if verify and not writer.counting_only:
        verify_output(plan, folder, caster, quantizer)
    return damage


@dataclass(frozen=True)
class ShardJob:
    """What each worker of a parallel conversion is sent once (its setup): the plan, the staging folder
    every worker writes into, the formats its caster and quantizer are built for, and the limits."""

    plan: OutputPlan
    folder: Path
    cast_to: NumberFormat
    quantize: NumberFormat | None
    refuses: Callable[[TensorDamage], bool] | None
    cast_chunk_elements: int
    quantize_chunk_elements: int
    verify: bool = False


def _write_shards_on(executor: Executor, plan: OutputPlan, folder: Path, caster: ChunkCaster,
                     refuses: Callable[[TensorDamage], bool] | None, progress: Progress | None,
                     quantizer: ChunkQuantizer | None, verify: bool) -> list[TensorDamage]:
    """:func:`write_shards` with one task per shard on ``executor``; progress advances by a shard's source
    bytes as it finishes."""
    job = ShardJob(plan, folder, caster.fmt, quantizer.fmt if quantizer else None, refuses,
                   caster.chunk_elements, quantizer.chunk_elements if quantizer else 0, verify)
    sizes = [sum(item.entry.nbytes for item in shard.items) for shard in plan.shards]

    def done(index: int, result: object) -> None:
        if progress is not None and not isinstance(result, TaskFailure):
            progress.advance(sizes[index], detail=plan.shards[index].file)

    results = executor.run(functools.partial(_shard_worker, job), _write_shard_task,
                           list(range(len(plan.shards))), on_done=done)
    failed = [(plan.shards[i].file, r) for i, r in enumerate(results) if isinstance(r, TaskFailure)]
    if failed:
        file, failure = failed[0]
        if failure.error is not None:
            raise failure.error
        others = f" (and {len(failed) - 1} more shard(s))" if len(failed) > 1 else ""
        raise CheckpointError(f"output shard {file} failed on {executor.describe()}, after a retry: "
                              f"{failure.reason}{others}; nothing was written")
    return [tensor for damage in results for tensor in damage]


def _shard_worker(job: ShardJob) -> tuple[ShardJob, _ShardWriter]:
    """A worker's state: the job and a writer whose caster's and quantizer's buffers serve every shard."""
    caster = ChunkCaster(job.cast_to, job.cast_chunk_elements)
    quantizer = (ChunkQuantizer(job.quantize, job.quantize_chunk_elements) if job.quantize is not None
                 else None)
    return job, _ShardWriter({}, caster, quantizer, None, job.refuses)


def _write_shard_task(state: tuple[ShardJob, _ShardWriter], index: int) -> list[TensorDamage]:
    """One shard, written by a worker into the shared staging folder from sources it opens itself (and,
    asked to, re-read and checked); a retry first removes what the failed try left of the file."""
    job, writer = state
    shard = job.plan.shards[index]
    path = job.folder / shard.file
    path.unlink(missing_ok=True)
    writer.counting_only = False  # every shard written on its own: what another shard refused is not here
    alone = OutputPlan([shard], None, {})
    with ExitStack() as stack:
        writer.sources = _open_sources(alone, stack)
        damage = writer.write(shard, path)
    if job.verify and not writer.counting_only:
        verify_output(alone, job.folder, writer.caster, writer.quantizer)
    return damage


_COUNTED = (Action.CAST, Action.QUANTIZED)
"""What is still read once nothing more is written: what has damage to count."""


class _ShardWriter:
    """Writes output files: the header, then every output at its planned offset; after a refused
    tensor, counts without writing (``counting_only``)."""

    def __init__(self, sources: dict[Path, int], caster: ChunkCaster, quantizer: ChunkQuantizer | None,
                 progress: Progress | None, refuses: Callable[[TensorDamage], bool] | None):
        self.sources, self.caster, self.quantizer = sources, caster, quantizer
        self.progress, self.refuses = progress, refuses
        self.counting_only = False

    def tick(self, count: int) -> None:
        """Report ``count`` more bytes of source data streamed (or skipped, when counting only)."""
        if self.progress is not None:
            self.progress.advance(count)

    def write(self, shard: PlannedShard, path: Path) -> list[TensorDamage]:
        header, placed = shard.layout()
        starts = part_offsets(placed, len(header))
        fd, damage = None if self.counting_only else _create(path), []
        try:
            if fd is not None:
                write_all(fd, memoryview(header), path)
            for position, (item, index, begin, _) in enumerate(placed):
                following = placed[position + 1][0] if position + 1 < len(placed) else None
                if following is not None and (not self.counting_only or following.action in _COUNTED):
                    _prefetch(following, self.sources)
                if index:  # a quantized item's later parts: written with its first
                    continue
                result = self._write_item(item, None if self.counting_only else fd, path,
                                          len(header) + begin, starts)
                damage.append(result)
                if self.refuses is not None and self.refuses(result):
                    self.counting_only = True
        finally:
            if fd is not None:
                os.close(fd)
        return damage

    def _write_item(self, item: PlannedTensor, fd: int | None, path: Path, start: int,
                    starts: dict[int, list[int]]) -> TensorDamage:
        """Write (``fd`` None: only count) one planned tensor."""
        src_fd = self.sources[item.shard.path]
        if item.action != Action.QUANTIZED:
            if fd is not None:
                os.lseek(fd, start, os.SEEK_SET)  # sequential unless quantized parts sit in between
            return _stream_item(item, src_fd, fd, path, self.caster, self.tick)
        positions, counts = list(starts[id(item)]), []
        for chunk, damage, nbytes in quantized_chunks(item, src_fd, self.quantizer):
            for part, data in enumerate(chunk):
                if data is not None and fd is not None:
                    pwrite_all(fd, data, positions[part], path)
                    positions[part] += len(data)
            counts.append(damage)  # a future: counted while the next chunk is quantized
            self.tick(nbytes)
        return functools.reduce(TensorDamage.merged, (count.result() for count in counts),
                                _quantized_damage(item, self.quantizer))


def part_offsets(placed: list[Placed], data_start: int) -> dict[int, list[int]]:
    """File offset of every part of each quantized item (keyed by ``id(item)``), in part order."""
    starts: dict[int, dict[int, int]] = {}
    for item, index, begin, _ in placed:
        if item.action == Action.QUANTIZED:
            starts.setdefault(id(item), {})[index] = data_start + begin
    return {key: [found[i] for i in sorted(found)] for key, found in starts.items()}


def _quantized_damage(item: PlannedTensor, quantizer: ChunkQuantizer) -> TensorDamage:
    entry = item.entry
    return TensorDamage(entry.name, dtype_name(entry.torch_dtype), (item.fmt or quantizer.fmt).name,
                        Action.QUANTIZED,
                        entry.numel, aliases=item.names[1:])


def quantized_chunks(item: PlannedTensor, src_fd: int, quantizer: ChunkQuantizer):
    """Quantize ``item``'s rows chunk by chunk: yield (bytes per part, or None where a whole-tensor
    part was already given; a future of the chunk's damage; source bytes read). The quantizer's second
    thread counts each chunk and reads the next while this one is quantized; every count and read has
    finished when the generator is done (or closed)."""
    entry = item.entry
    rows, cols = item.quantized_shape
    row_bytes, start = cols * entry.torch_dtype.itemsize, item.shard.data_start + entry.begin
    chunks = quantizer.row_chunks(rows, cols, item.fmt)

    def fill(first: int) -> Callable[[memoryview], None]:
        return lambda view: read_exact(src_fd, view, start + first * row_bytes, item.shard.path, entry.name)

    with quantizer.counting(len(chunks)):
        if item.transposed:  # (in, out) on disk: read it whole once, quantize rows of its transpose
            view = quantizer.buffer(entry.nbytes)
            read_exact(src_fd, view, start, item.shard.path, entry.name)
            whole = quantizer.transposed(entry.torch_dtype, cols, rows)  # (out, in), a copy: counts read it
        else:
            fill(0)(quantizer.buffer(chunks[0][1] * row_bytes))
        for index, (first, count) in enumerate(chunks):
            if index:
                quantizer.next_chunk()  # its rows read ahead meanwhile
            if not item.transposed and index + 1 < len(chunks):
                quantizer.read_ahead(chunks[index + 1][1] * row_bytes, fill(chunks[index + 1][0]))
            try:
                qt, damage = (quantizer.quantize_rows(whole[first:first + count], item.fmt) if item.transposed
                              else quantizer.quantize(entry.torch_dtype, count, cols, item.fmt))
            except InputError as exc:
                raise InputError(f"tensor {entry.name!r}: {exc}; or keep the layer dense with "
                                 f"--keep {entry.name!r}") from None
            parts = to_parts(qt, (rows, cols))
            read = count * row_bytes
            yield [None if first and suffix in WHOLE_TENSOR_PARTS else tensor_bytes(tensor)
                   for suffix, tensor in parts.items()], damage, read


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


def _stream_item(item: PlannedTensor, src_fd: int, dst_fd: int | None, path: Path, caster: ChunkCaster,
                 tick: Callable[[int], None]) -> TensorDamage:
    """Write one tensor: bytes copied by the kernel, or cast chunk by chunk through the caster. With
    ``dst_fd`` None, only count: a cast is still read and counted, a copy (nothing to count) skipped."""
    entry, start = item.entry, item.shard.data_start + item.entry.begin
    result = TensorDamage(entry.name, dtype_name(entry.torch_dtype), dtype_name(DTYPES[item.out_dtype]),
                          item.action, entry.numel, aliases=item.names[1:])
    if item.action != Action.CAST:
        if dst_fd is not None:
            copy_range(src_fd, dst_fd, start, entry.nbytes, caster.raw, (item.shard.path, path), entry.name)
        tick(entry.nbytes)
        return result
    itemsize = entry.torch_dtype.itemsize

    def read(view: memoryview, first: int) -> None:
        read_exact(src_fd, view, start + first * itemsize, item.shard.path, entry.name)

    write = None if dst_fd is None else lambda out: write_all(dst_fd, out, path)
    return result.merged(caster.stream(entry.numel, entry.torch_dtype, read, write, tick))


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
    cast = cast_to if any(i.action == Action.CAST for i in plan.items) else None
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
                if item.action == Action.QUANTIZED:
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
    for chunk, damage, _ in quantized_chunks(item, src_fd, quantizer):
        damage.result()  # a count that failed fails the verification too, as when writing
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
    itemsize = entry.torch_dtype.itemsize if item.action == Action.CAST else 1
    step = caster.chunk_elements if item.action == Action.CAST else len(check)
    numel = entry.numel if item.action == Action.CAST else entry.nbytes
    out_itemsize = DTYPES[item.out_dtype].itemsize if item.action == Action.CAST else 1
    for first in range(0, numel, step):
        count = min(step, numel - first)
        source = memoryview(caster.raw)[:count * itemsize]
        read_exact(src_fd, source, start + first * itemsize, item.shard.path, entry.name)
        expected = caster.cast(entry.torch_dtype, count)[0] if item.action == Action.CAST else source
        actual = memoryview(check)[:count * out_itemsize]
        read_exact(out_fd, actual, out_start + first * out_itemsize, path, entry.name)
        if not torch.equal(torch.frombuffer(expected, dtype=torch.uint8),
                           torch.frombuffer(actual, dtype=torch.uint8)):
            raise _verify_error(path, entry.name, "cast")
