"""Will this model fit in format X? Predicted from one float32 run, before anything is cast.

For every module the float32 activations (its output) and its own weights are rounded to each
target format with :func:`~dtypelab.quant.round_trip` — the same rounding a cast applies — and counted
by the one damage accounting (:func:`~dtypelab.quant.count_damage`, which ``convert`` reports with too):
values that would overflow (to inf / NaN, or saturate at the largest finite value), flush to zero, or
fall subnormal. From the overflowing modules a keep-in-float32 list is built that, given to
``KeepPolicy(name_patterns=...)``, lets the model run without inf or NaN.

Analysis stage. Weight statistics live in :mod:`~dtypelab.analysis.weights`, noise floors and verdicts
in :mod:`~dtypelab.analysis.verdict`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import DtypelabError, InputError
from ..formats import NumberFormat, get_format
from ..naming import is_inside
from ..progress import Progress, ProgressCallback, stage
from ..quant import DamageCounts, KeepPolicy, cast_model, count_damage, overflow_threshold, round_trip
from ..report import Table, TableMixin, to_jsonable
from ..tree import iter_tensors
from ..variants import is_peer_spec
from .run import run_model, select_layers, select_output

UNDERFLOW_SHARE = 0.01  # a layer is flagged when >= 1% of its non-zero values flush or go subnormal


class RangeCounts(DamageCounts):
    """What rounding to one format would do to a set of values, accumulated over tensors and calls: the
    damage accounting's counts (:class:`~dtypelab.quant.DamageCounts`; ``overflowed`` is beyond
    :func:`~dtypelab.quant.overflow_threshold`, as ``convert`` counts it) plus headroom's reading of them.
    """

    def add_values(self, tensor: torch.Tensor, fmt: NumberFormat) -> None:
        """Round ``tensor`` to ``fmt`` (:func:`~dtypelab.quant.round_trip`) and count what happened."""
        self.add(count_formats(tensor, [fmt])[0])

    def headroom_bits(self, fmt: NumberFormat) -> float:
        """log2(max_finite / absmax): binades to spare before overflow (negative: overflows)."""
        return math.log2(fmt.max_finite / self.absmax) if self.absmax else math.inf

    def verdict(self) -> str:
        """``non-finite in float32``, ``overflow``, ``flush to zero``, ``subnormal`` or ``ok``."""
        if self.non_finite:
            return "non-finite in float32"
        if self.overflowed:
            return "overflow"
        if self.nonzero and self.flushed_to_zero / self.nonzero >= UNDERFLOW_SHARE:
            return "flush to zero"
        if self.nonzero and self.subnormal / self.nonzero >= UNDERFLOW_SHARE:
            return "subnormal"
        return "ok"


def count_formats(tensor: torch.Tensor, fmts: Sequence[NumberFormat]) -> list[DamageCounts]:
    """What rounding ``tensor`` to each format does, exactly as :func:`~dtypelab.quant.count_damage`
    counts it.

    Why not simply ``count_damage`` per format: it makes some twenty passes over the values per format,
    and a forward's every activation is counted. Most tensors cannot overflow — finite, every magnitude
    below the format's overflow threshold — and for those the overflow and non-finite masks are all
    false, so the range (one pass, shared by the formats) and, per format, the flushes, subnormals and
    relative error (the same operations ``count_damage`` makes, so the same floats; none at all for the
    flushes and subnormals when every non-zero magnitude is at least the smallest normal) give the
    identical counts in a third of the passes. Any other tensor is counted by ``count_damage`` itself.
    """
    values = tensor.detach().float().reshape(-1)
    if not values.numel():
        return [count_damage(values, values, fmt, sums=False) for fmt in fmts]
    magnitudes = values.abs()
    low, high = (float(v) for v in torch.aminmax(magnitudes))  # NaN / inf propagate to both
    nonzero = int(torch.count_nonzero(magnitudes)) if low == 0 else values.numel()
    if low == 0 and nonzero:
        low = float(magnitudes.masked_fill(magnitudes == 0, math.inf).min())
    return [_in_range_counts(values, magnitudes, fmt, nonzero, high, low if nonzero else math.inf)
            if _cannot_overflow(fmt, high) else count_damage(values, round_trip(values, fmt), fmt, sums=False)
            for fmt in fmts]


def _cannot_overflow(fmt: NumberFormat, absmax: float) -> bool:
    """Finite values all below the overflow threshold of a plain float format (round to nearest)."""
    floating = not fmt.is_quantized and fmt.torch_dtype is not None and fmt.torch_dtype.is_floating_point
    return floating and math.isfinite(absmax) and absmax < overflow_threshold(fmt)


def _in_range_counts(values: torch.Tensor, magnitudes: torch.Tensor, fmt: NumberFormat, nonzero: int,
                     absmax: float, smallest_nonzero: float) -> DamageCounts:
    """``count_damage``'s counts for finite values that cannot overflow ``fmt``."""
    stored = round_trip(values, fmt)
    flushed = subnormal = 0
    if smallest_nonzero < fmt.smallest_normal:  # else nothing can flush or turn subnormal
        stored_nonzero = int(torch.count_nonzero(stored))
        flushed = nonzero - stored_nonzero
        below_normal = int(torch.lt(stored.abs(), fmt.smallest_normal).sum())
        subnormal = below_normal - (values.numel() - stored_nonzero)
    error = torch.sub(stored, values).abs_()  # as count_damage: |s - x| / |x|, 0/0 -> 0
    max_rel = float(error.div_(magnitudes).nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0).max())
    return DamageCounts(values.numel(), nonzero, 0, absmax, 0, flushed, subnormal, max_rel)


@dataclass
class LayerHeadroom:
    """One module against one format: its output values (all calls) and its own weights."""

    name: str
    module_type: str
    format: str
    activations: RangeCounts
    weights: RangeCounts | None

    @property
    def overflows(self) -> bool:
        return bool(self.activations.overflowed or (self.weights and self.weights.overflowed))

    def verdict(self) -> str:
        """The worse of the activation and weight verdicts, saying which one it is."""
        act = self.activations.verdict()
        weight = self.weights.verdict() if self.weights else "ok"
        if weight == "overflow" or (act == "ok" and weight != "ok"):
            return f"weights: {weight}"
        return act if act == "ok" else f"activations: {act}"


@dataclass
class HeadroomReport(TableMixin):
    """The result of :func:`predict_headroom`: per module and format, plus a keep list per format.

    ``keep`` maps each plain format to module names to keep in float32 (what ``--keep`` takes);
    ``keep_status`` says for each what was established: ``"verified"`` (the model cast with that keep
    list ran finite on these inputs), ``"output overflows"`` (the model's own output exceeds the
    format: no keep list inside the model changes that), ``"not verified"`` (a format no model computes
    in, e.g. fp8, or float32 values already non-finite) or ``"unrepaired"`` (the repair gave up).
    ``not_predicted`` maps each scaled (quantized) format or peer asked for to why it has no rows.
    """

    rows: list[LayerHeadroom]
    keep: dict[str, list[str]] = field(default_factory=dict)
    formats: dict[str, NumberFormat] = field(default_factory=dict, repr=False)
    not_measured: list[str] = field(default_factory=list)  # modules that ran without a floating output
    not_predicted: dict[str, str] = field(default_factory=dict)
    keep_status: dict[str, str] = field(default_factory=dict)

    def keep_policy(self, fmt: str | NumberFormat) -> KeepPolicy:
        """The :class:`~dtypelab.cast.KeepPolicy` that keeps this format's overflowing modules in float32.

        Raises:
            InputError: ``fmt`` was not among the formats predicted.
        """
        name = get_format(fmt).name
        if name not in self.keep:
            raise InputError(f"no keep list for {name}: predict_headroom was run for "
                             f"{', '.join(self.keep) or 'no plain format'}; add {name} to its formats")
        return KeepPolicy(name_patterns=tuple(self.keep[name]))

    def json_body(self) -> dict:
        """The fields, each row with its derived ``headroom_bits`` and ``verdict`` too (what the table and
        the HTML report show), so a saved document renders without the formats' figures."""
        rows = [{**to_jsonable(r), **to_jsonable({"headroom_bits": r.activations.headroom_bits(
            self.formats[r.format]), "verdict": r.verdict()})} for r in self.rows]
        return {**to_jsonable(self), "rows": rows}

    def to_table(self) -> Table:
        # the JSON's field names: the row's activations' own, its weights' with their prefix; headroom_bits
        # and verdict are derived from them
        columns = ["layer", "module_type", "format", "absmax", "headroom_bits", "overflowed",
                   "flushed_to_zero", "subnormal", "weights.absmax", "weights.overflowed", "verdict"]
        rows = [[r.name or "(model)", r.module_type, r.format, r.activations.absmax,
                 r.activations.headroom_bits(self.formats[r.format]), r.activations.overflowed,
                 r.activations.flushed_to_zero, r.activations.subnormal,
                 r.weights.absmax if r.weights else None, r.weights.overflowed if r.weights else None,
                 r.verdict()] for r in self.rows]
        notes = [_keep_note(name, keep, self.keep_status.get(name, "")) for name, keep in self.keep.items()]
        if self.not_measured:
            notes.append(f"not measured (no floating output): {', '.join(self.not_measured)}")
        notes += [f"not predicted for {name}: {reason}" for name, reason in self.not_predicted.items()]
        return Table("Overflow headroom predicted from the float32 run", columns, rows, notes,
                     default_columns=["layer", "format", "headroom_bits", "overflowed", "flushed_to_zero",
                                      "verdict"])


def _keep_note(fmt_name: str, keep: list[str], status: str) -> str:
    names = ", ".join(repr(k) for k in keep) if keep else "nothing"
    if status == "output overflows":
        return (f"keep in float32 for {fmt_name}: {names}; the model's own output overflows {fmt_name}, "
                "which no keep list inside the model changes: run it in a wider format")
    said = {"verified": " (verified: the cast model runs finite on these inputs)",
            "unrepaired": f" (not enough: the {fmt_name} model still overflows; see the rows)"}
    return f"keep in float32 for {fmt_name}: {names}{said.get(status, '')}"


def predict_headroom(model: nn.Module, inputs: torch.Tensor | Mapping[str, torch.Tensor],
                     formats: Sequence[str | NumberFormat], *, depth: int | None = None,
                     patterns: Sequence[str] = (),
                     progress: ProgressCallback | None = None) -> HeadroomReport:
    """Run ``model`` once as it is (float32) and predict, per module, what each format would do.

    Every module is measured (the keep list needs them all); ``depth`` / ``patterns`` (as in
    :func:`dtypelab.analysis.run.select_layers`) only choose the rows shown. Each output is counted and
    dropped inside its hook, so memory stays at a plain forward's plus a few copies of one activation.
    Scaled (quantized) formats get no rows, only a note in ``not_predicted``: a scale per row or block
    moves the range to the values, and their quantized variants keep activations in float.
    ``progress`` (a :data:`~dtypelab.progress.ProgressCallback`) is told each module call counted (stage
    ``headroom``; the total is not known ahead, as a module may run several times).

    Returns:
        A :class:`HeadroomReport`; ``report.keep_policy("fp16")`` feeds :func:`dtypelab.cast_model`.
    """
    peers = [f for f in formats if isinstance(f, str) and is_peer_spec(f)]
    requested = [get_format(f) for f in formats if f not in peers]
    fmts = [f for f in requested if not f.is_quantized]
    shown = set(select_layers(model, depth, patterns)) | {""} if depth is not None or patterns else None
    counts, skipped = _count_outputs(model, inputs, fmts, stage(progress, "headroom", "module calls"))
    by_name = {f.name: f for f in fmts}
    rows = [_layer_headroom(model, name, by_name[fmt], counts) for name, fmt in counts]  # execution order
    keep, status = {}, {}
    for fmt in fmts:
        fmt_rows = [r for r in rows if r.format == fmt.name]
        keep[fmt.name], status[fmt.name] = repaired_keep_list(model, inputs, fmt, fmt_rows)
    visible = [r for r in rows if shown is None or r.name in shown]
    return HeadroomReport(visible, keep, by_name, sorted(set(skipped) - {n for n, _ in counts}),
                          {f.name: SCALED_REASON for f in requested if f.is_quantized}
                          | dict.fromkeys(peers, PEER_REASON), status)


def _count_outputs(model: nn.Module, inputs, fmts: list[NumberFormat],
                   bar: Progress) -> tuple[dict, list[str]]:
    """One forward with every module's output counted per format: ``{(name, format): RangeCounts}`` in
    execution order, and the modules that ran without a floating output."""
    counts: dict[tuple[str, str], RangeCounts] = {}
    skipped: list[str] = []
    handles = [module.register_forward_hook(_counting_hook(name, fmts, counts, skipped, bar))
               for name, module in model.named_modules()]
    try:
        with torch.inference_mode():
            run_model(model, inputs)
    finally:
        for handle in handles:
            handle.remove()
    return counts, skipped


PEER_REASON = "a peer library's quantization keeps activations in float and scales its weights itself"
SCALED_REASON = ("a scaled format has no fixed range (each row or block gets its own scale) and its "
                 "quantized variants compute in float; see the weight statistics (--weights) instead")


def _counting_hook(name: str, fmts: list[NumberFormat], counts: dict, skipped: list[str], bar: Progress):
    def hook(module: nn.Module, args: tuple, output: object) -> None:
        try:
            tensor = select_output(output)
        except (DtypelabError, TypeError):  # no tensor in this output (caches, None): nothing to count
            tensor = None
        if tensor is None or not tensor.is_floating_point():
            skipped.append(name)
            return
        for fmt, counted in zip(fmts, count_formats(tensor, fmts), strict=True):
            counts.setdefault((name, fmt.name), RangeCounts()).add(counted)
        bar.advance(detail=name)
    return hook


def _layer_headroom(model: nn.Module, name: str, fmt: NumberFormat, counts: dict) -> LayerHeadroom:
    module = model.get_submodule(name)
    weights = [p for p in module.parameters(recurse=False) if p.is_floating_point()]
    weight_counts = None
    if weights:
        weight_counts = RangeCounts()
        for weight in weights:
            weight_counts.add_values(weight, fmt)
    return LayerHeadroom(name, type(module).__name__, fmt.name, counts[(name, fmt.name)], weight_counts)


def keep_list(rows: Sequence[LayerHeadroom]) -> list[str]:
    """Where the overflow starts, for one format: each module whose output (or weight) overflows while
    none of its submodules' does. ``""`` stands for the model itself (it overflows in its own forward).

    A kept module hands its float32 output on as it is (see :class:`~dtypelab.quant.KeepPolicy`), so
    these are the modules to start from; :func:`repaired_keep_list` adds what a run of the cast model
    shows is still needed (the norm that takes a kept layer's large output, an attention whose scores
    overflow inside its forward).
    """
    overflowing = {r.name for r in rows if r.overflows}
    origins = [n for n in overflowing
               if not any(o != n and is_inside(o, n) for o in overflowing)]  # no overflowing submodule
    return sorted(origins)


MAX_REPAIR_ROUNDS = 64
"""Forwards :func:`repaired_keep_list` may spend adding modules; each round adds one."""


def repaired_keep_list(model: nn.Module, inputs, fmt: NumberFormat,
                       rows: Sequence[LayerHeadroom]) -> tuple[list[str], str]:
    """A keep list for ``fmt`` that, applied with ``--keep``, makes the forward finite on ``inputs``.

    Starts from :func:`keep_list`, then runs the model cast to ``fmt`` with it and, while the output is
    not finite, keeps the first module where a non-finite value appears: one whose finite inputs became
    inf when cast to ``fmt`` on the way in, or whose finite inputs gave a non-finite output. One forward
    per round (:data:`MAX_REPAIR_ROUNDS` at most).

    Returns:
        The sorted names (none inside another) and its status (see :class:`HeadroomReport`).
    """
    keep = [n for n in keep_list(rows) if n]
    output_overflows = any(r.name == "" and r.activations.overflowed for r in rows)
    if fmt.torch_dtype is None or fmt.torch_dtype.itemsize < 2 or any(r.activations.non_finite for r in rows):
        return _outermost(keep), "not verified"
    for _ in range(MAX_REPAIR_ROUNDS):
        culprit = _first_non_finite(cast_model(model, fmt, KeepPolicy(name_patterns=tuple(keep))), inputs)
        if culprit is None:
            return _outermost(keep), "verified"
        if culprit == "" or culprit in keep:  # the model's own arithmetic, outside every module, overflows
            return _outermost(keep), "output overflows" if output_overflows or culprit == "" else "unrepaired"
        keep.append(culprit)
    return _outermost(keep), "unrepaired"


def _outermost(names: list[str]) -> list[str]:
    return sorted(n for n in set(names) if not any(o != n and is_inside(n, o) for o in names))


class _FoundNonFinite(Exception):
    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name


def _first_non_finite(model: nn.Module, inputs) -> str | None:
    """The first module (in execution order) where the run turns non-finite, ``""`` when only the
    model's own arithmetic does, None when the output is finite."""
    names = {id(m): n for n, m in model.named_modules()}
    handles, received = [], {}

    computes_on: dict[int, list[bool]] = {}  # per module, a stack: whether its (cast) inputs are finite

    def before_cast(module, args, kwargs):  # first pre-hook: the inputs as the module was handed them
        received[id(module)] = _finite(args) and _finite(kwargs)

    def after_cast(module, args, kwargs):  # last pre-hook: what it computes on
        finite = _finite(args) and _finite(kwargs)
        if received.get(id(module)) and not finite:
            raise _FoundNonFinite(names[id(module)])
        computes_on.setdefault(id(module), []).append(finite)

    def after_forward(module, args, kwargs, output):
        if computes_on[id(module)].pop() and not _finite(output):
            raise _FoundNonFinite(names[id(module)])

    for module in model.modules():
        handles += [module.register_forward_pre_hook(before_cast, with_kwargs=True, prepend=True),
                    module.register_forward_pre_hook(after_cast, with_kwargs=True),
                    module.register_forward_hook(after_forward, with_kwargs=True)]
    try:
        output = run_model(model, inputs)
    except _FoundNonFinite as found:
        return found.name
    finally:
        for handle in handles:
            handle.remove()
    return None if _finite(output) else ""


def _finite(value: object) -> bool:
    """Whether every floating tensor inside ``value`` (tensors, tuples, lists, dicts, outputs) is finite."""
    return all(_tensor_finite(t) for t in iter_tensors(value) if t.is_floating_point())


def _tensor_finite(tensor: torch.Tensor) -> bool:
    """``tensor.isfinite().all()``, from the minimum and maximum (NaN and inf propagate to them): one
    pass without a mask, ~5x faster, and fp16 / bf16 ``isfinite`` is the slowest kernel of a
    verification run on a CPU."""
    if not tensor.numel():
        return True
    low, high = torch.aminmax(tensor)
    return bool(torch.isfinite(low) & torch.isfinite(high))
