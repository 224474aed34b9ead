"""Will this model fit in format X? Predicted from one float32 run, before anything is cast.

For every module the float32 activations (its output) and its own weights are rounded to each
target format with the registry's ``NumberFormat.round_trip`` — the same rounding a cast applies —
and counted: values that would overflow (to inf / NaN, or saturate at the largest finite value),
flush to zero, or fall subnormal. From the overflowing modules a keep-in-float32 list is built that,
given to ``KeepPolicy(name_patterns=...)``, lets the model run without inf or NaN.

Also here: weight statistics with each format's weight-only error, the noise floors (the error that
rounding to a format alone causes, for one tensor and carried through the whole model) and the verdict
on a variant's output.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from .cast import KeepPolicy, map_tensors
from .compare import OutputMetrics, measure, run_model, select_output, sqnr_db, valid_positions
from .errors import DtypelabError, InputError
from .formats import NumberFormat, get_format
from .quantize import quantize_model
from .report import Table, TableMixin

UNDERFLOW_SHARE = 0.01  # a layer is flagged when >= 1% of its non-zero values flush or go subnormal
OUTLIER_SIGMAS = 6.0  # |w - mean| > 6 std: ~2e-9 of a Gaussian, so any share is heavy-tailedness


# ---- counting what a format does to a tensor ----------------------------------------------------

@dataclass
class RangeCounts:
    """What rounding to one format would do to a set of values (accumulates over tensors/calls).

    ``overflow`` counts finite values that become inf/NaN or saturate (clip) at ``max_finite``;
    ``flush_to_zero`` non-zero values that become 0; ``subnormal`` values that land below the
    format's smallest normal (fewer significant bits); ``non_finite`` values that are already inf or
    NaN in the float32 run (no format can help those, and they are left out of the other counts).
    """

    numel: int = 0
    nonzero: int = 0
    absmax: float = 0.0
    overflow: int = 0
    flush_to_zero: int = 0
    subnormal: int = 0
    non_finite: int = 0

    def add(self, tensor: torch.Tensor, fmt: NumberFormat) -> None:
        """Round ``tensor`` to ``fmt`` (via its ``round_trip``) and count what happened."""
        values = tensor.detach().float()
        rounded = fmt.round_trip(values).abs()
        magnitude = values.abs()
        finite = values.isfinite()
        self.numel += values.numel()
        self.non_finite += int((~finite).sum())
        self.nonzero += int((finite & (magnitude > 0)).sum())
        self.absmax = max(self.absmax, magnitude[finite].max().item() if finite.any() else 0.0)
        # Saturated: clipped to the top of the range with more than the unit roundoff (eps/2) lost;
        # a value just above max_finite that merely rounds down to it is ordinary rounding.
        clipped = magnitude - rounded > magnitude * fmt.eps / 2
        saturated = rounded.isfinite() & (magnitude > fmt.max_finite) & clipped
        self.overflow += int((finite & ~rounded.isfinite()).sum() + saturated.sum())
        self.flush_to_zero += int(((magnitude > 0) & (rounded == 0)).sum())
        self.subnormal += int(((rounded > 0) & (rounded < fmt.smallest_normal)).sum())

    def headroom_bits(self, fmt: NumberFormat) -> float:
        """log2(max_finite / absmax): binades to spare before overflow (negative: overflows)."""
        return math.log2(fmt.max_finite / self.absmax) if self.absmax else math.inf

    def verdict(self) -> str:
        """``non-finite in float32``, ``overflow``, ``flush to zero``, ``subnormal`` or ``ok``."""
        if self.non_finite:
            return "non-finite in float32"
        if self.overflow:
            return "overflow"
        if self.nonzero and self.flush_to_zero / self.nonzero >= UNDERFLOW_SHARE:
            return "flush to zero"
        if self.nonzero and self.subnormal / self.nonzero >= UNDERFLOW_SHARE:
            return "subnormal"
        return "ok"


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
        return bool(self.activations.overflow or (self.weights and self.weights.overflow))

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

    ``not_predicted`` maps each scaled (quantized) format asked for to why it has no rows.
    """

    rows: list[LayerHeadroom]
    keep: dict[str, list[str]] = field(default_factory=dict)
    formats: dict[str, NumberFormat] = field(default_factory=dict, repr=False)
    not_measured: list[str] = field(default_factory=list)  # modules that ran without a floating output
    not_predicted: dict[str, str] = field(default_factory=dict)

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

    def to_table(self) -> Table:
        columns = ["layer", "type", "format", "act_absmax", "headroom_bits", "overflow", "flush_to_zero",
                   "subnormal", "weight_absmax", "weight_overflow", "verdict"]
        rows = [[r.name or "(model)", r.module_type, r.format, r.activations.absmax,
                 r.activations.headroom_bits(self.formats[r.format]), r.activations.overflow,
                 r.activations.flush_to_zero, r.activations.subnormal,
                 r.weights.absmax if r.weights else None, r.weights.overflow if r.weights else None,
                 r.verdict()] for r in self.rows]
        notes = [_keep_note(name, keep) for name, keep in self.keep.items()]
        if self.not_measured:
            notes.append(f"not measured (no floating output): {', '.join(self.not_measured)}")
        notes += [f"not predicted for {name}: {reason}" for name, reason in self.not_predicted.items()]
        return Table("Overflow headroom predicted from the float32 run", columns, rows, notes)


def _keep_note(fmt_name: str, keep: list[str]) -> str:
    if keep == [""]:  # a kept model's output is still cast back to the format
        return (f"keep in float32 for {fmt_name}: the whole model, and even so its output overflows "
                f"{fmt_name}: run it in a wider format")
    return f"keep in float32 for {fmt_name}: " + (", ".join(repr(k) for k in keep) if keep else "nothing")


def predict_headroom(model: nn.Module, inputs: torch.Tensor | Mapping[str, torch.Tensor],
                     formats: Sequence[str | NumberFormat], *, depth: int | None = None,
                     patterns: Sequence[str] = ()) -> HeadroomReport:
    """Run ``model`` once as it is (float32) and predict, per module, what each format would do.

    Every module is measured (the keep list needs them all); ``depth`` / ``patterns`` (as in
    :func:`dtypelab.layers.select_layers`) only choose the rows shown. Each output is counted and
    dropped inside its hook, so memory stays at a plain forward's plus a few copies of one activation.
    Scaled (quantized) formats get no rows, only a note in ``not_predicted``: a scale per row or block
    moves the range to the values, and their quantized variants keep activations in float.

    Returns:
        A :class:`HeadroomReport`; ``report.keep_policy("fp16")`` feeds :func:`dtypelab.cast_model`.
    """
    from .layers import select_layers  # layers imports this module

    requested = [get_format(f) for f in formats]
    fmts = [f for f in requested if not f.is_quantized]
    shown = set(select_layers(model, depth, patterns)) | {""} if depth is not None or patterns else None
    counts, skipped = _count_outputs(model, inputs, fmts)
    by_name = {f.name: f for f in fmts}
    rows = [_layer_headroom(model, name, by_name[fmt], counts) for name, fmt in counts]  # execution order
    keep = {fmt.name: keep_list([r for r in rows if r.format == fmt.name]) for fmt in fmts}
    visible = [r for r in rows if shown is None or r.name in shown]
    return HeadroomReport(visible, keep, by_name, sorted(set(skipped) - {n for n, _ in counts}),
                          {f.name: SCALED_REASON for f in requested if f.is_quantized})


def _count_outputs(model: nn.Module, inputs, fmts: list[NumberFormat]) -> tuple[dict, list[str]]:
    """One forward with every module's output counted per format: ``{(name, format): RangeCounts}`` in
    execution order, and the modules that ran without a floating output."""
    from .layers import forward  # layers imports this module

    counts: dict[tuple[str, str], RangeCounts] = {}
    skipped: list[str] = []
    handles = [module.register_forward_hook(_counting_hook(name, fmts, counts, skipped))
               for name, module in model.named_modules()]
    try:
        with torch.inference_mode():
            forward(model, inputs)
    finally:
        for handle in handles:
            handle.remove()
    return counts, skipped


SCALED_REASON = ("a scaled format has no fixed range (each row or block gets its own scale) and its "
                 "quantized variants compute in float; see the weight statistics (--weights) instead")


def _counting_hook(name: str, fmts: list[NumberFormat], counts: dict, skipped: list[str]):
    def hook(module: nn.Module, args: tuple, output: object) -> None:
        try:
            tensor = select_output(output)
        except (DtypelabError, TypeError):  # no tensor in this output (caches, None): nothing to count
            tensor = None
        if tensor is None or not tensor.is_floating_point():
            skipped.append(name)
            return
        for fmt in fmts:
            counts.setdefault((name, fmt.name), RangeCounts()).add(tensor, fmt)
    return hook


def _layer_headroom(model: nn.Module, name: str, fmt: NumberFormat, counts: dict) -> LayerHeadroom:
    module = model.get_submodule(name)
    weights = [p for p in module.parameters(recurse=False) if p.is_floating_point()]
    weight_counts = None
    if weights:
        weight_counts = RangeCounts()
        for weight in weights:
            weight_counts.add(weight, fmt)
    return LayerHeadroom(name, type(module).__name__, fmt.name, counts[(name, fmt.name)], weight_counts)


def keep_list(rows: Sequence[LayerHeadroom]) -> list[str]:
    """Module names to keep in float32 so that no value overflows, for one format.

    A kept module's output is cast back to the model's dtype, so keeping the overflowing module
    itself is not enough: for each overflowing module the nearest enclosing module (itself
    included) whose output fits is kept. ``""`` (the whole model) when even the output overflows.
    Names inside another kept name are dropped.
    """
    by_name = {r.name: r for r in rows}
    kept: set[str] = set()
    for row in rows:
        if row.overflows:
            kept.add(_fitting_ancestor(row.name, by_name))
    return sorted(n for n in kept if not any(_inside(n, other) for other in kept if other != n))


def _fitting_ancestor(name: str, by_name: Mapping[str, LayerHeadroom]) -> str:
    candidate = name
    while candidate:
        row = by_name.get(candidate)
        if row is not None and not row.activations.overflow:
            return candidate
        candidate = candidate.rpartition(".")[0]
    return ""


def _inside(name: str, outer: str) -> bool:
    return outer == "" or name.startswith(outer + ".")


# ---- weight statistics -------------------------------------------------------------------------

@dataclass(frozen=True)
class WeightStats:
    """One floating parameter: its spread and what each format's rounding does to it alone.

    ``kurtosis`` is the excess kurtosis (0 for a Gaussian); ``outlier_share`` the share of values
    farther than ``OUTLIER_SIGMAS`` standard deviations from the mean; ``sqnr_db`` maps format name
    to the SQNR of the weight rounded to that format (inf when exact).
    """

    name: str
    shape: tuple[int, ...]
    absmax: float
    std: float
    kurtosis: float
    outlier_share: float
    sqnr_db: dict[str, float]


@dataclass
class WeightReport(TableMixin):
    """The result of :func:`weight_stats`."""

    rows: list[WeightStats]
    formats: list[str]

    def to_table(self) -> Table:
        columns = ["parameter", "shape", "absmax", "std", "kurtosis", "outlier_share",
                   *[f"sqnr_db {f}" for f in self.formats]]
        rows = [[w.name, list(w.shape), w.absmax, w.std, w.kurtosis, w.outlier_share,
                 *[w.sqnr_db[f] for f in self.formats]] for w in self.rows]
        notes = ["kurtosis is nan for a constant tensor (std 0, e.g. a freshly initialised norm weight)"
                 ] if any(math.isnan(w.kurtosis) for w in self.rows) else []
        return Table("Weight statistics and weight-only rounding error", columns, rows, notes)


def weight_stats(model: nn.Module, formats: Sequence[str | NumberFormat]) -> WeightReport:
    """Absmax, std, kurtosis, outlier share and per-format weight-only SQNR of every floating parameter
    (tied parameters once, under their first name)."""
    fmts = [get_format(f) for f in formats]
    rows = [_weight_row(name, p.detach(), fmts) for name, p in model.named_parameters()
            if p.is_floating_point()]
    return WeightReport(rows, [f.name for f in fmts])


def _weight_row(name: str, weight: torch.Tensor, fmts: list[NumberFormat]) -> WeightStats:
    values = weight.double().flatten()
    mean, std = values.mean(), values.std(unbiased=False)
    centred = values - mean
    kurtosis = (centred.pow(4).mean() / std.pow(4)).item() - 3 if std > 0 else math.nan
    outliers = (centred.abs() > OUTLIER_SIGMAS * std).double().mean().item() if std > 0 else 0.0
    return WeightStats(name, tuple(weight.shape), values.abs().max().item(), std.item(), kurtosis, outliers,
                       {f.name: sqnr_db(weight, f.round_trip(weight)) for f in fmts})


# ---- noise floor and verdict ---------------------------------------------------------------------

def noise_floor_db(reference: torch.Tensor, fmt: str | NumberFormat) -> float | None:
    """SQNR (dB) of ``reference`` rounded to ``fmt`` and back: the error storing it in the format alone
    causes, before any arithmetic in the format adds more. inf for an exact format; None for a scaled
    (quantized) format, whose variants keep activations such as ``reference`` in float. Summed in
    chunks: one rounded copy of ``reference`` is the only full-size temporary."""
    fmt = get_format(fmt)
    if fmt.is_quantized:
        return None
    values = reference.detach().float()
    return measure(values, fmt.round_trip(values)).sqnr_db


NOISE_MARGIN_DB = 3.0
"""How far below the rounding floor a variant may sit and still be "within format noise": 3 dB is twice
the noise power of rounding alone, i.e. the arithmetic inside modules (accumulation, intermediate casts)
may add as much noise again as rounding their outputs. Measured gaps (fp16 and bf16 casts of
tiny-llama, tiny-gpt2 and all-MiniLM-L6-v2 on their default inputs): 0.3 to 2.6 dB."""


def rounding_floor_db(reference: nn.Module, fmt: str | NumberFormat,
                      inputs: torch.Tensor | Mapping[str, torch.Tensor], *,
                      reference_output: torch.Tensor | None = None, output_name: str | None = None) -> float:
    """The model's output SQNR (dB) when the only error is rounding to ``fmt``, all arithmetic in float32.

    For a plain format (fp16, bf16) every floating weight and buffer and every leaf module's output are
    rounded to it. A scaled format (int8, int4:g128, fp8_e4m3, mxfp4 …) stores only the weights of the
    layers :func:`dtypelab.quantize_model` quantizes, and its variants compute in float with activations
    left as they are (or fake-quantized as the spec's ``:a8`` / ``:afp8`` says): its floor is that
    quantized model run on float32 inputs. This is the noise a variant in ``fmt`` cannot avoid, carried
    through the network as the network amplifies it; padding (``attention_mask`` in ``inputs``) is left
    out as in :func:`dtypelab.compare.compare_models`. Costs one copy of the weights and one forward.

    Args:
        reference_output: the reference's selected output, if already computed (saves a forward).
    """
    fmt = get_format(fmt)
    simulated = quantize_model(reference, fmt).model if fmt.is_quantized else _rounded_model(reference, fmt)
    out = select_output(run_model(simulated, inputs), output_name)
    if reference_output is None:
        reference_output = select_output(run_model(reference, inputs), output_name)
    mask = inputs.get("attention_mask") if isinstance(inputs, Mapping) else None
    return measure(valid_positions(reference_output, mask), valid_positions(out, mask)).sqnr_db


def _rounded_model(model: nn.Module, fmt: NumberFormat) -> nn.Module:
    """A float32 copy of ``model`` with its weights and every leaf module's output rounded to ``fmt``."""
    simulated = _rounded_copy(model, fmt)
    for module in simulated.modules():
        if next(module.children(), None) is None:
            module.register_forward_hook(_RoundOutput(fmt))
    return simulated


def _rounded_copy(model: nn.Module, fmt: NumberFormat) -> nn.Module:
    """A copy of ``model`` whose floating tensors are rounded to ``fmt`` (still float32); ties stay tied."""
    memo: dict[int, torch.Tensor] = {}
    for tensor in [*model.parameters(), *model.buffers()]:
        if tensor.is_floating_point() and id(tensor) not in memo:
            data = fmt.round_trip(tensor.detach())
            is_param = isinstance(tensor, nn.Parameter)
            memo[id(tensor)] = nn.Parameter(data, requires_grad=False) if is_param else data
    return copy.deepcopy(model, memo)


class _RoundOutput:
    """Forward hook: every floating tensor of a module's output rounded to the format."""

    def __init__(self, fmt: NumberFormat) -> None:
        self.fmt = fmt

    def __call__(self, module: nn.Module, args: tuple, output: object) -> object:
        return map_tensors(output, lambda t: self.fmt.round_trip(t) if t.is_floating_point() else t)


def variant_verdict(metrics: OutputMetrics, floor_db: float | None, top1_threshold: float = 0.9,
                    margin_db: float = NOISE_MARGIN_DB) -> str:
    """Is this variant's output error what its format implies?

    ``broken``: any inf/NaN, or top-1 agreement below ``top1_threshold``. ``within format noise``:
    SQNR at least ``floor_db - margin_db``, where ``floor_db`` is :func:`rounding_floor_db` (see
    ``NOISE_MARGIN_DB``). ``degraded``: below that. ``unknown`` when there is no floor (a variant not
    named after a format) or the floor itself is not finite-or-inf (rounding alone overflows).
    """
    if metrics.nan_count or metrics.inf_count:
        return "broken"
    if metrics.top1_agreement is not None and metrics.top1_agreement < top1_threshold:
        return "broken"
    if floor_db is None or math.isnan(floor_db) or math.isnan(metrics.sqnr_db):
        return "unknown"
    return "within format noise" if metrics.sqnr_db >= floor_db - margin_db else "degraded"
