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

import dataclasses
import math
import os
import re
import shutil
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import CheckpointError, DamageError, InputError
from ..executor import Executor
from ..formats import NumberFormat, all_formats, get_format
from ..naming import name_matches, tensor_matches
from ..progress import ProgressCallback, stage
from ..quant import PLAN_DENSE_REASON, Action, MixedPlan, TensorDamage, dtype_name, model_fingerprint
from ..quant.damage import NEGLIGIBLE_FLUSH
from ..report import Table, TableMixin, to_jsonable
from .architecture import linear_layers
from .guard import refuse_links_outside
from .layouts import check_supported, quantization_config
from .pickled import pickle_refusal, pickle_weights, pickles_as_safetensors
from .plan import CAST_DTYPES, OutputPlan, Quantization, parse_size, plan_output
from .safetensors_file import DTYPE_CODES, CheckpointSource, TensorEntry, open_checkpoint
from .staging import StagedOutput, follow_source_modes
from .streaming import ChunkCaster, ChunkQuantizer, one_thread
from .writer import copy_extra, read_config, write_index, write_shards


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
        other_dense: for quantized formats, the other 2-D tensors left dense: no ``nn.Linear`` or
            ``Conv1D`` of the model built from config.json holds them (embeddings, fused MoE experts).
        limits: what ``strict`` let through (None without ``strict``).
        refused: True when ``strict`` refused the output: nothing was written (``destination`` stays
            absent, ``bytes_written`` is 0) and the counts are what the conversion would have done.
        reason: the refusal's message (None unless refused).
        refused_tensors: the tensors past the limits, in output order.
        cautions: what a reader of the output must know (e.g. quantized GPT-2 Conv1D layers, which
            transformers + compressed-tensors cannot load).
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
    limits: DamageLimits | None = None
    refused: bool = False
    reason: str | None = None
    refused_tensors: list[str] = field(default_factory=list)
    cautions: list[str] = field(default_factory=list)

    @property
    def total(self) -> TensorDamage:
        """All tensors' counts added up (max_rel_error is the largest of any)."""
        total = TensorDamage("total", "", self.format, "total", sum(t.numel for t in self.tensors))
        for tensor in self.tensors:
            total = total.merged(tensor)
        return total

    def worst(self, count: int = 5) -> list[TensorDamage]:
        """The most damaged cast or quantized tensors: lost values first (those ``--strict`` counts,
        then negligible flushes), then subnormals, then the lowest SQNR (quantized), then the largest
        relative error."""
        changed = [t for t in self.tensors if t.action in (Action.CAST, Action.QUANTIZED)]
        return sorted(changed, key=lambda t: (-t.overflowed - t.significant_flushes, -t.lost_values,
                                              -t.subnormal, _sqnr_key(t), -t.max_rel_error))[:count]

    def to_table(self) -> Table:
        quantized = any(t.action == Action.QUANTIZED for t in self.tensors)
        columns = ["name", "source_dtype", "output_dtype", "numel", "overflowed", "flushed_to_zero",
                   "subnormal", "max_rel_error", *(["sqnr_db"] if quantized else [])]  # the JSON's names
        rows = [[t.name, t.source_dtype, t.output_dtype, t.numel, t.overflowed, t.flushed_to_zero,
                 t.subnormal, t.max_rel_error, *([t.sqnr_db] if quantized else [])]
                for t in [*self.worst(), self.total]]
        actions = {a: sum(t.action == a for t in self.tensors)
                   for a in (Action.QUANTIZED, Action.CAST, Action.COPIED, Action.KEPT)
                   if a != Action.QUANTIZED or quantized}
        notes = [f"refused: {self.reason}"] if self.refused else []
        notes += [f"{self.source} -> {self.destination}: {', '.join(f'{n} {a}' for a, n in actions.items())}"
                 f"; {self.bytes_read:,} bytes read, {self.bytes_written:,} written in "
                 f"{len(self.shards)} file(s)" + (f" + {self.index_file}" if self.index_file else ""),
                 f"copied {len(self.copied_files)} other file(s); config.json updated: "
                 f"{self.config_updated}; verified bit for bit: "
                 f"{self.verified if self.verified else 'not asked (--verify)'}"]
        if self.skipped_files:
            notes.append(f"not copied (other weights, source precision): {', '.join(self.skipped_files)}")
        negligible = [t for t in self.tensors if t.negligible_flushes]
        if negligible:
            count, power = sum(t.negligible_flushes for t in negligible), int(math.log2(NEGLIGIBLE_FLUSH))
            notes.append(f"flushed_to_zero holds {count} negligible flush(es) in {len(negligible)} "
                         f"tensor(s): every value flushed there lies below 2^{power} of its tensor's RMS "
                         "(--strict lets them through)")
        tied = [f"{alias} = {t.name}" for t in self.tensors for alias in t.aliases]
        if tied:
            notes.append("tied: " + ", ".join(tied) + " (stored once under the second name; the first is "
                         "metadata 'tied_aliases', as safetensors allows one name per byte range)")
        if quantized:
            notes.append("quantized: overflowed = clipped beyond what the scheme maps by rounding (an :mse "
                         "clip, fp8 saturation); flushed_to_zero = small values on the zero code (expected "
                         "on a coarse grid; --strict refuses only clipping)")
        notes += [f"caution: {caution}" for caution in self.cautions]
        notes += [f"dense: {name} ({reason})" for name, reason in self.dense_layers.items()]
        if self.other_dense:
            shown = ", ".join(self.other_dense[:4]) + (", ..." if len(self.other_dense) > 4 else "")
            notes.append(f"dense, no Linear or Conv1D of the model holds them (embeddings, ...): "
                         f"{len(self.other_dense)} 2-D tensor(s) ({shown})")
        compact = ["name", "output_dtype", "overflowed", "flushed_to_zero",
                   "sqnr_db" if quantized else "max_rel_error"]
        return Table(f"Conversion to {self.format}: most damaged tensors", columns, rows, notes,
                     default_columns=compact)

    def json_body(self) -> dict:
        """The full report (every tensor, with its ``lost_values``, ``sqnr_db``, ``rms`` and its flushes
        split into ``negligible_flushes`` / ``significant_flushes``) that ``--report FILE`` writes, also
        when ``--strict`` refused the output (``"refused": true``, ``"reason"``)."""
        total = {**_damage_json(self.total), "rms": None, "max_flushed_rel_rms": None,
                 "negligible_flushes": sum(t.negligible_flushes for t in self.tensors),
                 "significant_flushes": sum(t.significant_flushes for t in self.tensors)}
        return {**to_jsonable(self), "tensors": [_damage_json(t) for t in self.tensors], "total": total}


def _damage_json(damage: TensorDamage) -> dict:
    rms = damage.rms
    relative = damage.max_flushed / rms if rms and damage.flushed_to_zero else None
    return to_jsonable({**to_jsonable(damage), "lost_values": damage.lost_values, "sqnr_db": damage.sqnr_db,
                        "rms": rms, "max_flushed_rel_rms": relative,
                        "negligible_flushes": damage.negligible_flushes,
                        "significant_flushes": damage.significant_flushes})


@dataclass(frozen=True)
class DamageLimits:
    """What ``--strict`` lets through, per tensor: a tensor is refused when it overflows (quantized:
    clips) more than ``max_overflowed`` values, or flushes more significant values to zero (flushes
    that are not :attr:`~dtypelab.quant.TensorDamage.negligible_flushes`) than it is allowed.

    Per tensor, not in total, so the allowance does not grow with the checkpoint and the refusal can
    name exactly the tensors to keep.

    Args:
        max_flushed: significant flushes allowed per tensor (a count).
        flushed_fraction: when set, the allowance is instead this fraction of the tensor's values.
        max_overflowed: overflowed (quantized: clipped) values allowed per tensor.
    """

    max_flushed: int = 0
    flushed_fraction: float | None = None
    max_overflowed: int = 0

    def refuses(self, damage: TensorDamage) -> bool:
        """Whether this tensor's damage is past the limits."""
        return self.flushes_past(damage) or damage.overflowed > self.max_overflowed

    def flushes_past(self, damage: TensorDamage) -> bool:
        """Whether the tensor flushes more significant values than it is allowed."""
        allowed = self.max_flushed if self.flushed_fraction is None else self.flushed_fraction * damage.numel
        return damage.significant_flushes > allowed


def convert_checkpoint(source: str | os.PathLike, destination: str | os.PathLike,
                       to: str | NumberFormat, *, keep: Iterable[str] = (),
                       max_shard_size: str | int | None = None, force: bool = False,
                       verify: bool = False, strict: bool = False,
                       progress: ProgressCallback | None = None,
                       dense: str | NumberFormat | None = None, fsync: bool = False,
                       max_flushed: int | float | str | None = None,
                       max_overflowed: int | str | None = None, head: bool = False,
                       embeddings: bool = False, plan: MixedPlan | str | os.PathLike | None = None,
                       allow_pickle: bool = False, executor: Executor | None = None) -> ConversionResult:
    """Convert a safetensors file or folder to another format, tensor by tensor.

    Plain formats (fp32, fp16, bf16, ``fp8_e4m3:cast``): floating tensors (fp16/bf16/fp32/fp64) are
    cast; integer, bool and fp8 tensors, tensors already in the target dtype and those matching
    ``keep`` (exact names or globs) are copied bit for bit. Quantized formats (int8, int4:g128,
    fp8_e4m3, ...) store every Linear weight of the model folder in the compressed-tensors layout
    (see :mod:`dtypelab.checkpoint.layouts`), row chunk by row chunk, and add the ``quantization_config`` to
    config.json; other tensors are copied, or cast to ``dense``.

    Args:
        source: a ``.safetensors`` file or model folder; opened read-only. With ``allow_pickle``, also a
            ``.bin`` / ``.pt`` file or a folder of pickle weights (``pytorch_model.bin``).
        destination: a folder, or a ``.safetensors`` file name when ``source`` is a file.
        to: target format name (``"bf16"``, ``"int4:g128"``) or :class:`NumberFormat`.
        keep: tensor names or globs (``"*norm*"``) left as they are.
        max_shard_size: reshard into files of at most this many bytes (``"5GB"``); ``None`` keeps
            the source's shards.
        force: replace an existing destination.
        verify: re-read the output and check every tensor against its source, bit for bit.
        strict: raise :class:`DamageError` (and write nothing) if a tensor loses values: any overflow
            (quantized: a value clipped), or a flush to zero that is not negligible (a tensor's flushes
            are negligible when the largest is below 2^-10 of its RMS, see
            :data:`~dtypelab.quant.damage.NEGLIGIBLE_FLUSH`). Every tensor is still counted, so the
            error's ``result`` attribute is the complete report, with ``refused`` True.
        progress: a :data:`~dtypelab.progress.ProgressCallback`, told the source bytes streamed
            (stage ``convert``); returning False cancels the conversion (nothing is written).
        dense: for quantized formats, cast the tensors left dense (embeddings, norms, biases) to this
            plain format (``"bf16"``); None copies them as stored.
        fsync: flush the output to disk before renaming it into place (and the folder after), so a
            power loss, not only a killed process, leaves the destination complete or absent. Off by
            default: it costs the disk's write time, which ``cp`` does not wait for either.
        max_flushed: with ``strict``, the significant flushes each tensor may have: a count (``3``, or
            ``"3"``) or a fraction of its values (``1e-6``, or ``"1e-6"``; a float is a fraction).
            Default 0.
        max_overflowed: with ``strict``, the overflowed (quantized: clipped) values each tensor may
            have, a count. Default 0: any overflow is real damage.
        plan: a mixed-precision plan (:class:`~dtypelab.quant.MixedPlan` or its JSON file, written by
            ``dtypelab plan -o``): each layer it names is stored in its own format, one config group per
            scheme; ``to`` is then None. A plan made for other weights (fingerprint or layer names)
            is refused before anything is written.
        allow_pickle: read pickle weights, through ``torch.load(weights_only=True)``: they are written
            as safetensors in a staging folder beside the destination (removed afterwards, and found as
            a leftover if the run is killed), then converted as that checkpoint. Without it a pickle
            source is refused in one line naming the option.
        executor: write each output shard as a task of this :class:`~dtypelab.executor.Executor`
            (``LocalProcesses(2)``, ``RayExecutor("auto")``): every worker opens the sources itself and
            writes its shards into the one staging folder, which is renamed into place only when every
            shard is done; the bytes are those of the in-process conversion. A shard that fails twice
            (or whose worker dies) fails the conversion, naming the shard, and nothing is written.
            Across nodes the staging folder (beside the destination) and the source must be on a
            filesystem every worker shares. None (the default): this process, tensor by tensor.

    Returns:
        A :class:`ConversionResult` with the damage per tensor.
    Raises:
        DamageError: under ``strict``, when a tensor is past the limits (exit code 3); the message names
            those tensors and the smallest fix, and the exception's ``result`` is the refused
            conversion's :class:`ConversionResult` (``refused`` True, nothing written).
    Example:
        >>> convert_checkpoint("llama-folder", "llama-w4", "int4:g128", dense="bf16")  # doctest: +SKIP
    """
    pickles = pickle_weights(source)
    if pickles:
        if not allow_pickle:
            raise pickle_refusal(pickles[0], "convert")
        options = {"keep": keep, "max_shard_size": max_shard_size, "force": force, "verify": verify,
                   "strict": strict, "progress": progress, "dense": dense, "fsync": fsync,
                   "max_flushed": max_flushed, "max_overflowed": max_overflowed, "head": head,
                   "embeddings": embeddings, "plan": plan, "executor": executor}
        return _convert_pickles(Path(source), pickles, Path(destination), to, options)
    limits = _damage_limits(strict, max_flushed, max_overflowed)
    if Path(source).suffix == ".gguf":
        raise InputError(f"{source} is a GGUF file: convert reads safetensors checkpoints; load it once "
                         "(dtypelab.load, or the built-in smollm2, which caches an ordinary folder) and "
                         "convert that folder")
    src, dst = open_checkpoint(source), Path(destination)
    plan = MixedPlan.load(plan) if isinstance(plan, str | os.PathLike) else plan
    fmt = _target_format(to, plan)
    dst_is_file = _check_destination(src, dst)
    if plan is not None:
        cast_to, quant, dense_layers, other_dense = _planned_conversion(src, plan, dense, tuple(keep))
    else:
        cast_to, quant, dense_layers, other_dense = _conversion(src, fmt, dense, tuple(keep), head,
                                                                embeddings)
    output = plan_output(src, dst, dst_is_file, cast_to, tuple(keep), parse_size(max_shard_size), quant)
    with StagedOutput(dst, force, src.path) as staging, one_thread():
        extra, skipped = _extra_files(src)
        _check_free_space(staging.tmp, output, extra)
        caster, quantizer = ChunkCaster(cast_to or get_format("fp32")), quant and ChunkQuantizer(fmt)
        bar = stage(progress, "convert", "bytes", sum(i.entry.nbytes for i in output.items))
        refuses = limits.refuses if limits is not None else None
        damage = write_shards(output, staging.tmp, caster, refuses, bar, quantizer, executor, verify)
        refused = [t for t in damage if refuses is not None and refuses(t)]
        if refused:  # raised inside the staging, which removes the partial output
            raise _refusal(refused, fmt, cast_to, quant is not None, ConversionResult(
                src.path, dst, fmt.name, [s.file for s in output.shards], output.index_name, damage, [],
                _relative(src, skipped), False, sum(i.entry.nbytes for i in output.items), 0, False,
                dense_layers, other_dense, limits))
        write_index(output, staging.tmp)
        qconfig = quantization_config(quant.by_module, list(dense_layers)) if quant else None
        config_updated = copy_extra(src, extra, staging.tmp, cast_to, output, qconfig)
        staging.commit(dst_is_file, durable=fsync)
    written = sum(len(s.layout()[0]) + sum(i.out_nbytes for i in s.items) for s in output.shards)
    name = fmt.name if plan is None else "plan: " + "+".join(sorted({f.name for f in quant.formats.values()}))
    return ConversionResult(src.path, dst, name, [s.file for s in output.shards], output.index_name,
                            damage, _relative(src, extra), _relative(src, skipped), config_updated,
                            sum(i.entry.nbytes for i in output.items), written, verify, dense_layers,
                            other_dense, limits, cautions=_cautions(quant))


def _convert_pickles(source: Path, pickles: list[Path], destination: Path, to: str | NumberFormat | None,
                     options: dict) -> ConversionResult:
    """Pickle weights written as safetensors in a staging folder beside ``destination`` (never
    committed: removed when the conversion of that copy ends, however it ends), then converted; the
    result names the pickle source."""
    with StagedOutput(destination.parent / f"{destination.name}.from-pickle", False, source) as staging:
        folder = staging.tmp / "weights"  # beside the staging lock, which is no file of the checkpoint
        folder.mkdir()
        copy = pickles_as_safetensors(source, pickles, folder)
        follow_source_modes(copy, source)  # so the output, which follows the copy, follows the pickles
        result = convert_checkpoint(copy, destination, to, **options)
    return dataclasses.replace(result, source=source)


def _target_format(to: str | NumberFormat | None, plan: MixedPlan | None) -> NumberFormat:
    """The one format, or for a plan the format its report is named by (its first scheme)."""
    if plan is None:
        if to is None:
            raise InputError("give a format to convert to (--to int4:g128) or a plan (--plan plan.json)")
        return get_format(to)
    if to is not None:
        raise InputError("--to and --plan both say which format each layer takes: give one of them")
    formats = sorted(set(plan.formats.values()))
    if not formats:
        raise InputError("the plan quantizes no layer (every layer dense): nothing to convert")
    return get_format(formats[0])


def _planned_conversion(src: CheckpointSource, plan: MixedPlan, dense: str | NumberFormat | None,
                        keep: tuple[str, ...]) -> tuple[NumberFormat | None, Quantization, dict[str, str],
                                                        list[str]]:
    """What a plan quantizes in this checkpoint, checked against it before anything is written: every
    layer it names is a Linear of the folder's model with a weight of that name, each format has a
    layout and fits the layer, and the planned weights are the ones the plan was made for."""
    _refuse_quantized_source(src)
    if keep:
        raise InputError("--keep and --plan: the plan already says which layers stay dense (make it with "
                         "`dtypelab plan --keep`): drop --keep")
    if _config_path(src) is None:
        raise InputError(f"{src.path}: a plan is written in the compressed-tensors layout, which needs the "
                         "model folder with its config.json")
    linears, _, conv1d = linear_layers(src.folder, src)
    entries = {e.name: e for shard in src.shards for e in shard.tensors}
    formats = {}
    for module, spec in plan.formats.items():
        fmt, entry = get_format(spec), entries.get(f"{module}.weight")
        if module not in linears or entry is None:
            raise InputError(f"the plan names layer {module!r}, which is no Linear layer of {src.path}: the "
                             f"plan was made for another model ({plan.model or 'unnamed'}); make one with "
                             "`dtypelab plan` for this folder")
        check_supported(fmt)
        inputs = entry.shape[0] if module in conv1d else entry.shape[1]
        problem = fmt.group_problem(inputs)
        if problem:
            raise InputError(f"the plan puts {module} in {fmt.name}, which cannot hold it: {problem}")
        formats[f"{module}.weight"] = fmt
    _check_fingerprint(src, plan, entries)
    layers = {tensor: tensor.removesuffix(".weight") for tensor in formats}
    dense_layers = {m: PLAN_DENSE_REASON for m in linears if f"{m}.weight" not in formats}
    transposed = frozenset(f"{m}.weight" for m in conv1d) & set(layers)
    quant = Quantization(next(iter(formats.values())), layers, transposed, formats)
    cast_to = _plain_format(dense) if dense is not None else None
    return cast_to, quant, dense_layers, _other_matrices(src, layers, dense_layers)


def _check_fingerprint(src: CheckpointSource, plan: MixedPlan, entries: dict) -> None:
    """The plan's fingerprint against the folder's own planned weights (read once, float32)."""
    if not plan.model_hash:
        return
    from safetensors import safe_open

    by_file = {e.name: shard.path for shard in src.shards for e in shard.tensors}
    weights = {}
    for module in plan.layers:
        name = f"{module}.weight"
        if name not in entries:
            raise InputError(f"the plan names layer {module!r}, which {src.path} does not store: make the "
                             "plan for this folder with `dtypelab plan`")
        with safe_open(str(by_file[name]), framework="pt") as handle:
            weights[module] = handle.get_tensor(name)
    found = model_fingerprint(weights)
    if found != plan.model_hash:
        raise InputError(f"the plan was made for other weights (fingerprint {plan.model_hash}, {src.path} "
                         f"has {found}): make a plan for this model with `dtypelab plan`")


def _damage_limits(strict: bool, max_flushed: int | float | str | None,
                   max_overflowed: int | str | None) -> DamageLimits | None:
    """The limits ``strict`` applies (None without it), from counts or fractions given as numbers or
    as the CLI's strings."""
    if not strict:
        given = [f"--max-{n}" for n, v in (("flushed", max_flushed), ("overflowed", max_overflowed))
                 if v is not None]
        if len(given) == 1:
            raise InputError(f"{given[0]} needs --strict (it loosens what --strict refuses): add --strict "
                             f"or drop {given[0]}")
        if given:
            raise InputError(f"{' and '.join(given)} need --strict (they loosen what --strict refuses): "
                             "add --strict or drop them")
        return None
    overflowed = _count(max_overflowed, "--max-overflowed", fraction=False)
    flushed = _count(max_flushed, "--max-flushed", fraction=True)
    if isinstance(flushed, float):
        return DamageLimits(0, flushed, int(overflowed))
    return DamageLimits(flushed, None, int(overflowed))


def _count(value: int | float | str | None, option: str, fraction: bool) -> int | float:
    """A limit: an integer count (``3``, ``"3"``) or, where ``fraction``, a float in [0, 1] (``1e-6``)."""
    takes = "a count (3) or a fraction of each tensor's values (1e-6)" if fraction else "a count (3)"
    if value is None:
        return 0
    given = value
    if isinstance(value, str):
        text = value.strip()
        try:
            value = int(text) if re.fullmatch(r"[+-]?\d+", text) else float(text)
        except ValueError:
            raise InputError(f"{option} takes {takes}, not {given!r}") from None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InputError(f"{option} takes {takes}, not {given!r}")
    if isinstance(value, int):
        if value < 0:
            raise InputError(f"{option} takes {takes}, not {given!r}: give 0 or more")
        return value
    if not fraction or not 0.0 <= value <= 1.0:  # NaN fails the range test too
        raise InputError(f"{option} takes {takes}, not {given!r}"
                         + (": a fraction lies in [0, 1], a count is a whole number" if fraction else ""))
    return value


def _refusal(refused: list[TensorDamage], fmt: NumberFormat, cast_to: NumberFormat | None, quantized: bool,
             result: ConversionResult) -> DamageError:
    """The DamageError of a refused conversion; its ``result`` attribute is ``result`` (what the conversion
    would have done, nothing written) marked refused, with the reason, for ``--report``."""
    result.refused, result.refused_tensors = True, [t.name for t in refused]
    result.reason = _refusal_reason(refused, result.limits or DamageLimits(), fmt, cast_to, quantized)
    error = DamageError(result.reason)
    error.result = result  # type: ignore[attr-defined]  # DamageError is the family's; the report rides on it
    return error


def _refusal_reason(refused: list[TensorDamage], limits: DamageLimits, fmt: NumberFormat,
                    cast_to: NumberFormat | None, quantized: bool) -> str:
    """One line: the refused tensors with what they lost, and the smallest fixes: keep those tensors
    (or, for what a quantized output leaves dense, cast it to bf16), or allow as many losses."""
    shown = "; ".join(_loss(t, fmt, cast_to) for t in refused[:3])
    if len(refused) > 3:
        shown += f"; and {len(refused) - 3} more tensor(s) (the --report lists every one)"
    fixes = []
    dense_cast = [t for t in refused if quantized and t.action == Action.CAST]
    if dense_cast and cast_to is not None and cast_to.name not in ("bf16", "fp32"):
        fixes.append("cast what stays dense to bf16 (float32's range) with --dense bf16")
    it = "it" if len(refused) == 1 else "them"
    keeps = " ".join(f"--keep {t.name!r}" for t in refused) if len(refused) <= 3 else "--keep NAME for each"
    layers = all(t.action == Action.QUANTIZED for t in refused)
    fixes.append(f"keep the layer(s) dense with {keeps}" if layers else f"keep {it} as stored with {keeps}")
    allow = []
    if any(t.overflowed > limits.max_overflowed for t in refused):
        allow.append(f"--max-overflowed {max(t.overflowed for t in refused)}")
    if any(limits.flushes_past(t) for t in refused):
        allow.append(f"--max-flushed {max(t.significant_flushes for t in refused)}")
    fixes.append(f"let {it} through with {' '.join(allow)}")
    return f"{shown}; nothing was written (--strict): {', '.join(fixes)}, or drop --strict"


def _loss(damage: TensorDamage, fmt: NumberFormat, cast_to: NumberFormat | None) -> str:
    """What one refused tensor lost, in words."""
    if damage.action == Action.QUANTIZED:
        return (f"tensor {damage.name!r}: {damage.overflowed} values are clamped beyond what {fmt.name}'s "
                "codes reach")
    target = (cast_to or fmt).name
    parts = [f"{damage.overflowed} values overflow"] if damage.overflowed else []
    if damage.significant_flushes:
        rms = damage.rms or 0.0
        scale = f"{damage.max_flushed / rms:.2g} of its RMS" if rms else "its RMS is 0"
        power = int(math.log2(NEGLIGIBLE_FLUSH))
        parts.append(f"{damage.significant_flushes} values flush to zero (the largest {scale}, above the "
                     f"negligible 2^{power})")
    return f"tensor {damage.name!r}: {' and '.join(parts)} in {target}"


CONV1D_CAUTION = ("{count} Conv1D layer(s) (GPT-2) stored quantized as their (out, in) transpose: "
                  "dtypelab.load reads them, and vLLM's GPT-2 computes with Linear layers of that shape; "
                  "transformers + compressed-tensors 0.20 cannot load them (it quantizes nn.Linear only and "
                  "would leave these weights random): --keep them, or load with dtypelab")


def _cautions(quant: Quantization | None) -> list[str]:
    """What the output's readers must know that no error says."""
    if quant is None or not quant.transposed:
        return []
    return [CONV1D_CAUTION.format(count=len(quant.transposed))]


def _relative(src: CheckpointSource, paths: list[Path]) -> list[str]:
    return [str(p.relative_to(src.folder)) for p in paths]


def _sqnr_key(damage: TensorDamage) -> float:
    return math.inf if damage.sqnr_db is None else damage.sqnr_db


def _conversion(src: CheckpointSource, fmt: NumberFormat, dense: str | NumberFormat | None,
                keep: tuple[str, ...], head: bool = False,
                embeddings: bool = False) -> tuple[NumberFormat | None, Quantization | None, dict[str, str],
                                                   list[str]]:
    """(format floating tensors are cast to, what is quantized, Linear layers left dense + why, other
    2-D tensors left dense)."""
    _refuse_quantized_source(src)
    if fmt.raw_castable and fmt.torch_dtype in DTYPE_CODES:
        options = (("--dense", dense is not None), ("--head", head), ("--embeddings", embeddings))
        given = [option for option, on in options if on]
        if given:
            raise InputError(f"{' and '.join(given)} applies to quantized formats; {fmt.name} casts every "
                             f"floating tensor: drop {' and '.join(given)}")
        return fmt, None, {}, []
    check_supported(fmt)
    if embeddings:
        raise InputError("convert writes the Linear and Conv1D weights in compressed-tensors' layouts, which "
                         "vLLM and transformers load; embeddings stay dense there: drop --embeddings "
                         "(compare --embeddings measures what quantizing them would cost)")
    cast_to = _plain_format(dense) if dense is not None else None
    quant, dense_layers, others = _plan_quantization(src, fmt, keep, head)
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
    skipped = [p for p in others if any(name_matches(p.name, w) for w in OTHER_WEIGHTS)]
    copied = [p for p in others if p not in skipped]
    refuse_links_outside(src.folder, copied)
    return copied, skipped


def _check_free_space(folder: Path, plan: OutputPlan, extra: list[Path]) -> None:
    needed = sum(i.out_nbytes for i in plan.items) + sum(p.stat().st_size for p in extra)
    free = shutil.disk_usage(folder).free
    if needed > free:
        raise CheckpointError(f"{folder.parent}: {needed} bytes needed but only {free} free: free space "
                              "or choose another output folder")


def _plan_quantization(src: CheckpointSource, fmt: NumberFormat, keep: tuple[str, ...],
                       head: bool = False) -> tuple[Quantization, dict[str, str], list[str]]:
    """Which Linear weights to quantize, the Linear layers left dense with their reason, and the other
    2-D tensors left dense."""
    if _config_path(src) is None:
        cast = next((f.name for f in all_formats() if f.torch_dtype == fmt.torch_dtype and not f.fixed_layout
                     and f.is_quantized), None) if fmt.is_floating_point else None  # mxfp8 -> fp8_e4m3
        hint = f"; for fp8 without scales use --to {cast}:cast" if cast else ""
        raise InputError(f"{src.path}: {fmt.name} is written in the compressed-tensors layout, which needs "
                         "the model folder with its config.json (to find the Linear layers and record the "
                         f"quantization_config){hint}")
    linears, heads, conv1d = linear_layers(src.folder, src)
    heads = set() if head else heads
    entries = {e.name: e for shard in src.shards for e in shard.tensors}
    tied = {name for shard in src.shards for group in shard.shared_groups() for name in group}
    layers, dense = {}, {}
    for module in linears:
        name = f"{module}.weight"
        reason = _dense_reason(module, entries.get(name), fmt, heads, name in tied, keep, conv1d)
        if reason:
            dense[module] = reason
        else:
            layers[name] = module
    if not layers:
        raise InputError(f"nothing to quantize in {src.path}: " + (
            "; ".join(f"{m}: {r}" for m, r in list(dense.items())[:3]) or "the model has no Linear layers"))
    transposed = frozenset(f"{m}.weight" for m in conv1d)
    return Quantization(fmt, layers, transposed & set(layers)), dense, _other_matrices(src, layers, dense)


def _other_matrices(src: CheckpointSource, layers: dict[str, str], dense: dict[str, str]) -> list[str]:
    """2-D float tensors that are no Linear or Conv1D weight of the model (embeddings, fused MoE experts):
    they stay dense, and the result names them."""
    linear = set(layers) | {f"{module}.weight" for module in dense}
    return [e.name for shard in src.shards for e in shard.tensors
            if len(e.shape) == 2 and e.dtype in CAST_DTYPES and e.name not in linear]


def _dense_reason(module: str, entry: TensorEntry | None, fmt: NumberFormat, heads: set[str], tied: bool,
                  keep: tuple[str, ...], conv1d: set[str]) -> str:
    """Why a Linear layer stays dense, or "" when its weight is quantized."""
    name = f"{module}.weight"
    if entry is None:
        return "no tensor of this name in the checkpoint (tied to another one, or named differently)"
    if module in heads:
        return ("output head: kept dense, as serving stacks (vLLM) load lm_head unquantized (--head "
                "quantizes it)")
    if any(tensor_matches(name, p) for p in keep):
        return "kept (--keep)"
    if tied:
        return "weight stored once for several tensors (tied)"
    if entry.dtype not in CAST_DTYPES or len(entry.shape) != 2 or not entry.numel:
        return f"weight is {dtype_name(entry.torch_dtype)} {list(entry.shape)}, not a non-empty 2-D float"
    inputs = entry.shape[0] if module in conv1d else entry.shape[1]  # Conv1D stores (in, out)
    return fmt.group_problem(inputs) or ""
