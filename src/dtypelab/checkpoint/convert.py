"""``convert_checkpoint``: a safetensors checkpoint in another format, in constant memory.

A checkpoint is one ``.safetensors`` file or a Hugging Face folder (shards listed by a
``*.safetensors.index.json``, or plain ``*.safetensors`` files). :func:`convert_checkpoint` streams every
tensor through reused buffers (see :mod:`dtypelab.checkpoint.streaming`), so its memory does not grow
with the checkpoint; it writes into a temporary folder beside the destination and renames it into place
only when complete, so a run that fails or is killed leaves no destination behind (and the next run
removes its leftovers).

Checkpoint stage: the top of it; it plans (:mod:`~dtypelab.checkpoint.plan`), streams
(:mod:`~dtypelab.checkpoint.writer`) and stages (:mod:`~dtypelab.checkpoint.staging`).
"""

from __future__ import annotations

import fnmatch
import json
import math
import os
import shutil
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import CheckpointError, InputError
from ..formats import Granularity, NumberFormat, get_format
from ..naming import name_matches
from ..progress import ProgressCallback, stage
from ..quant import Action, TensorDamage, dtype_name
from ..report import Table, TableMixin, to_jsonable
from .architecture import linear_layers
from .layouts import check_supported, quantization_config
from .plan import CAST_DTYPES, OutputPlan, Quantization, parse_size, plan_output
from .safetensors_file import DTYPE_CODES, CheckpointSource, TensorEntry, open_checkpoint
from .staging import StagedOutput
from .streaming import ChunkCaster, ChunkQuantizer, one_thread
from .writer import copy_extra, read_config, verify_output, write_index, write_shards


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
        config_updated: whether config.json was rewritten (dtype fields, quantization_config).
        bytes_read: tensor bytes read from the source.
        bytes_written: bytes of the safetensors files written, headers included.
        verified: whether the output was re-read and checked bit for bit.
        dense_layers: for quantized formats, the Linear layers left dense, each with its reason (they
            are the ``ignore`` list of the written ``quantization_config``).
        other_dense: for quantized formats, the other 2-D tensors left dense: no ``nn.Linear`` of the
            model built from config.json holds them (embeddings, Conv1D, fused MoE experts).
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
    dense_layers: dict[str, str] = field(default_factory=dict)
    other_dense: list[str] = field(default_factory=list)

    @property
    def total(self) -> TensorDamage:
        """All tensors' counts added up (max_rel_error is the largest of any)."""
        total = TensorDamage("total", "", self.format, "total", sum(t.numel for t in self.tensors))
        for tensor in self.tensors:
            total = total.merged(tensor)
        return total

    def worst(self, count: int = 5) -> list[TensorDamage]:
        """The most damaged cast or quantized tensors: lost values first, then subnormals, then the
        lowest SQNR (quantized), then the largest relative error."""
        changed = [t for t in self.tensors if t.action in (Action.CAST, Action.QUANTIZED)]
        return sorted(changed, key=lambda t: (-t.lost_values, -t.subnormal, _sqnr_key(t),
                                              -t.max_rel_error))[:count]

    def to_table(self) -> Table:
        quantized = any(t.action == Action.QUANTIZED for t in self.tensors)
        columns = ["tensor", "from", "to", "numel", "overflowed", "flushed_to_zero", "subnormal",
                   "max_rel_error", *(["sqnr_db"] if quantized else [])]
        rows = [[t.name, t.source_dtype, t.output_dtype, t.numel, t.overflowed, t.flushed_to_zero,
                 t.subnormal, t.max_rel_error, *([t.sqnr_db] if quantized else [])]
                for t in [*self.worst(), self.total]]
        actions = {a: sum(t.action == a for t in self.tensors)
                   for a in (Action.QUANTIZED, Action.CAST, Action.COPIED, Action.KEPT)
                   if a != Action.QUANTIZED or quantized}
        notes = [f"{self.source} -> {self.destination}: {', '.join(f'{n} {a}' for a, n in actions.items())}"
                 f"; {self.bytes_read:,} bytes read, {self.bytes_written:,} written in "
                 f"{len(self.shards)} file(s)" + (f" + {self.index_file}" if self.index_file else ""),
                 f"copied {len(self.copied_files)} other file(s); config.json updated: "
                 f"{self.config_updated}; verified bit for bit: {self.verified}"]
        if self.skipped_files:
            notes.append(f"not copied (other weights, source precision): {', '.join(self.skipped_files)}")
        tied = [f"{alias} = {t.name}" for t in self.tensors for alias in t.aliases]
        if tied:
            notes.append("tied: " + ", ".join(tied) + " (stored once under the second name; the first is "
                         "metadata 'tied_aliases', as safetensors allows one name per byte range)")
        if quantized:
            notes.append("quantized: overflowed = clipped beyond what the scheme maps by rounding (an :mse "
                         "clip, fp8 saturation); flushed_to_zero = small values on the zero code (expected "
                         "on a coarse grid; --strict refuses only clipping)")
        notes += [f"dense: {name} ({reason})" for name, reason in self.dense_layers.items()]
        if self.other_dense:
            shown = ", ".join(self.other_dense[:4]) + (", ..." if len(self.other_dense) > 4 else "")
            notes.append(f"dense, no nn.Linear of the model holds them: {len(self.other_dense)} 2-D "
                         f"tensor(s) ({shown})")
        return Table(f"Conversion to {self.format}: most damaged tensors", columns, rows, notes)

    def to_json(self) -> str:
        """The full report (every tensor, with its ``lost_values`` and ``sqnr_db``) that ``--report FILE``
        writes."""
        report = {**to_jsonable(self), "tensors": [_damage_json(t) for t in self.tensors],
                  "total": _damage_json(self.total)}
        return json.dumps(report, indent=2)


def _damage_json(damage: TensorDamage) -> dict:
    return to_jsonable({**to_jsonable(damage), "lost_values": damage.lost_values, "sqnr_db": damage.sqnr_db})


def convert_checkpoint(source: str | os.PathLike, destination: str | os.PathLike,
                       to: str | NumberFormat, *, keep: Iterable[str] = (),
                       max_shard_size: str | int | None = None, force: bool = False,
                       verify: bool = False, strict: bool = False,
                       progress: ProgressCallback | None = None,
                       dense: str | NumberFormat | None = None, fsync: bool = False) -> ConversionResult:
    """Convert a safetensors file or folder to another format, tensor by tensor.

    Plain formats (fp32, fp16, bf16, ``fp8_e4m3:cast``): floating tensors (fp16/bf16/fp32/fp64) are
    cast; integer, bool and fp8 tensors, tensors already in the target dtype and those matching
    ``keep`` (exact names or globs) are copied bit for bit. Quantized formats (int8, int4:g128,
    fp8_e4m3, ...) store every Linear weight of the model folder in the compressed-tensors layout
    (see :mod:`dtypelab.checkpoint.layouts`), row chunk by row chunk, and add the ``quantization_config`` to
    config.json; other tensors are copied, or cast to ``dense``.

    Args:
        source: a ``.safetensors`` file or model folder; opened read-only.
        destination: a folder, or a ``.safetensors`` file name when ``source`` is a file.
        to: target format name (``"bf16"``, ``"int4:g128"``) or :class:`NumberFormat`.
        keep: tensor names or globs (``"*norm*"``) left as they are.
        max_shard_size: reshard into files of at most this many bytes (``"5GB"``); ``None`` keeps
            the source's shards.
        force: replace an existing destination.
        verify: re-read the output and check every tensor against its source, bit for bit.
        strict: raise :class:`DamageError` (and write nothing) if any value overflows or flushes.
        progress: a :data:`~dtypelab.progress.ProgressCallback`, told the source bytes streamed
            (stage ``convert``); returning False cancels the conversion (nothing is written).
        dense: for quantized formats, cast the tensors left dense (embeddings, norms, biases) to this
            plain format (``"bf16"``); None copies them as stored.
        fsync: flush the output to disk before renaming it into place (and the folder after), so a
            power loss, not only a killed process, leaves the destination complete or absent. Off by
            default: it costs the disk's write time, which ``cp`` does not wait for either.

    Returns:
        A :class:`ConversionResult` with the damage per tensor.
    Example:
        >>> convert_checkpoint("llama-folder", "llama-w4", "int4:g128", dense="bf16")  # doctest: +SKIP
    """
    fmt, src, dst = get_format(to), open_checkpoint(source), Path(destination)
    dst_is_file = _check_destination(src, dst)
    cast_to, quant, dense_layers, other_dense = _conversion(src, fmt, dense, tuple(keep))
    plan = plan_output(src, dst, dst_is_file, cast_to, tuple(keep), parse_size(max_shard_size), quant)
    with StagedOutput(dst, force) as staging, one_thread():
        extra, skipped = _extra_files(src)
        _check_free_space(staging.tmp, plan, extra)
        caster, quantizer = ChunkCaster(cast_to or get_format("fp32")), quant and ChunkQuantizer(fmt)
        bar = stage(progress, "convert", "bytes", sum(i.entry.nbytes for i in plan.items))
        damage = write_shards(plan, staging.tmp, caster, strict, bar, quantizer)
        write_index(plan, staging.tmp)
        qconfig = quantization_config(fmt, list(dense_layers)) if quant else None
        config_updated = copy_extra(src, extra, staging.tmp, cast_to, plan, qconfig)
        if verify:
            verify_output(plan, staging.tmp, caster, quantizer)
        staging.commit(dst_is_file, durable=fsync)
    written = sum(len(s.layout()[0]) + sum(i.out_nbytes for i in s.items) for s in plan.shards)
    return ConversionResult(src.path, dst, fmt.name, [s.file for s in plan.shards], plan.index_name,
                            damage, _relative(src, extra), _relative(src, skipped), config_updated,
                            sum(i.entry.nbytes for i in plan.items), written, verify, dense_layers,
                            other_dense)


def _relative(src: CheckpointSource, paths: list[Path]) -> list[str]:
    return [str(p.relative_to(src.folder)) for p in paths]


def _sqnr_key(damage: TensorDamage) -> float:
    return math.inf if damage.sqnr_db is None else damage.sqnr_db


def _conversion(src: CheckpointSource, fmt: NumberFormat, dense: str | NumberFormat | None,
                keep: tuple[str, ...]) -> tuple[NumberFormat | None, Quantization | None, dict[str, str],
                                                list[str]]:
    """(format floating tensors are cast to, what is quantized, Linear layers left dense + why, other
    2-D tensors left dense)."""
    _refuse_quantized_source(src)
    if fmt.raw_castable and fmt.torch_dtype in DTYPE_CODES:
        if dense is not None:
            raise InputError(f"--dense applies to quantized formats; {fmt.name} casts every floating "
                             "tensor: drop --dense")
        return fmt, None, {}, []
    check_supported(fmt)
    cast_to = _plain_format(dense) if dense is not None else None
    quant, dense_layers, others = _plan_quantization(src, fmt, keep)
    return cast_to, quant, dense_layers, others


def _config_path(src: CheckpointSource) -> Path | None:
    """The folder's config.json, when it has one."""
    path = src.folder / "config.json" if src.folder else None
    return path if path and path.is_file() else None


def _refuse_quantized_source(src: CheckpointSource) -> None:
    """A quantized checkpoint's codes and scales are not values to cast: casting its scales would
    silently change its format."""
    config_path = _config_path(src)
    if config_path and "quantization_config" in read_config(config_path):
        raise InputError(f"{config_path} has a quantization_config: its tensors are codes and scales, not "
                         "values to convert; convert the unquantized checkpoint instead")


def _plain_format(spec: str | NumberFormat) -> NumberFormat:
    fmt = get_format(spec)
    if not fmt.raw_castable or fmt.torch_dtype not in DTYPE_CODES:
        raise InputError(f"--dense takes a plain floating format (fp32, fp16, bf16), not {fmt.name!r}")
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


OTHER_WEIGHTS = ("*.safetensors", "*.bin", "pytorch_model*.bin.index.json", "*.pt", "*.pth", "*.ckpt",
                 "*.gguf", "*.h5", "*.msgpack", "*.onnx", "*.onnx_data")
"""Weight files outside the checkpoint being converted (pickles, a stray consolidated safetensors)."""


def _extra_files(src: CheckpointSource) -> tuple[list[Path], list[Path]]:
    """The folder's other files, subfolders included: those to copy, and other weight files (pickles,
    GGUF, a consolidated ``original/*.pth``...) to leave out, as they would hold the weights again in
    the source precision."""
    if src.folder is None:
        return [], []
    weights = {src.folder / s.path.name for s in src.shards} | {src.folder / str(src.index_name)}
    others = [p for p in sorted(src.folder.rglob("*")) if p.is_file() and p not in weights]
    skipped = [p for p in others if any(fnmatch.fnmatch(p.name, w) for w in OTHER_WEIGHTS)]
    return [p for p in others if p not in skipped], skipped


def _check_free_space(folder: Path, plan: OutputPlan, extra: list[Path]) -> None:
    needed = sum(i.out_nbytes for i in plan.items) + sum(p.stat().st_size for p in extra)
    free = shutil.disk_usage(folder).free
    if needed > free:
        raise CheckpointError(f"{folder.parent}: {needed} bytes needed but only {free} free: free space "
                              "or choose another output folder")


def _plan_quantization(src: CheckpointSource, fmt: NumberFormat,
                       keep: tuple[str, ...]) -> tuple[Quantization, dict[str, str], list[str]]:
    """Which Linear weights to quantize, the Linear layers left dense with their reason, and the other
    2-D tensors left dense."""
    if _config_path(src) is None:
        hint = f"; for fp8 without scales use --to {fmt.base}:cast" if fmt.is_floating_point else ""
        raise InputError(f"{src.path}: {fmt.name} is written in the compressed-tensors layout, which needs "
                         "the model folder with its config.json (to find the Linear layers and record the "
                         f"quantization_config){hint}")
    linears, heads = linear_layers(src.folder)
    entries = {e.name: e for shard in src.shards for e in shard.tensors}
    tied = {name for shard in src.shards for group in shard.shared_groups() for name in group}
    layers, dense = {}, {}
    for module in linears:
        name = f"{module}.weight"
        reason = _dense_reason(module, entries.get(name), fmt, heads, name in tied, keep)
        if reason:
            dense[module] = reason
        else:
            layers[name] = module
    if not layers:
        raise InputError(f"nothing to quantize in {src.path}: " + (
            "; ".join(f"{m}: {r}" for m, r in list(dense.items())[:3]) or "the model has no Linear layers"))
    return Quantization(fmt, layers), dense, _other_matrices(src, layers, dense)


def _other_matrices(src: CheckpointSource, layers: dict[str, str], dense: dict[str, str]) -> list[str]:
    """2-D float tensors that are no Linear weight of the model (embeddings, GPT-2's Conv1D, fused MoE
    experts): they stay dense, and the result names them."""
    linear = set(layers) | {f"{module}.weight" for module in dense}
    return [e.name for shard in src.shards for e in shard.tensors
            if len(e.shape) == 2 and e.dtype in CAST_DTYPES and e.name not in linear]


def _dense_reason(module: str, entry: TensorEntry | None, fmt: NumberFormat, heads: set[str], tied: bool,
                  keep: tuple[str, ...]) -> str:
    """Why a Linear layer stays dense, or "" when its weight is quantized."""
    name = f"{module}.weight"
    if entry is None:
        return "no tensor of this name in the checkpoint (tied to another one, or named differently)"
    if module in heads:
        return "output head: kept dense, as serving stacks (vLLM) load lm_head unquantized"
    if any(name_matches(name, p) for p in keep):
        return "kept (--keep)"
    if tied:
        return "weight stored once for several tensors (tied)"
    if entry.dtype not in CAST_DTYPES or len(entry.shape) != 2 or not entry.numel:
        return f"weight is {dtype_name(entry.torch_dtype)} {list(entry.shape)}, not a non-empty 2-D float"
    if fmt.granularity == Granularity.GROUP and entry.shape[1] % fmt.group_size:
        return (f"group size {fmt.group_size} does not divide its {entry.shape[1]} inputs: use a group "
                "size that does, or :channel")
    return ""
