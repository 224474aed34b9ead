"""How far a candidate's outputs move from the reference's: the metrics and the comparison run.

Every metric takes ``reference`` and ``candidate`` tensors of one shape. Differences are taken in
float32, as the seed notebook does (``(logits_bf16 - logits_fp32).abs().mean()``), so its printed
numbers are reproduced to the last digit; sums of squares use float64 so large tensors stay exact.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from .errors import InputError
from .inspection import inspect_model
from .report import Table, TableMixin


def _diff(reference: torch.Tensor, candidate: torch.Tensor) -> torch.Tensor:
    return candidate.float() - reference.float()


def mean_abs_diff(reference: torch.Tensor, candidate: torch.Tensor) -> float:
    """Mean of |candidate - reference|, in float32 (the notebook's ``Mean diff``)."""
    return _diff(reference, candidate).abs().mean().item()


def max_abs_diff(reference: torch.Tensor, candidate: torch.Tensor) -> float:
    """Max of |candidate - reference|, in float32 (the notebook's ``Max diff``)."""
    return _diff(reference, candidate).abs().max().item()


def relative_error(reference: torch.Tensor, candidate: torch.Tensor) -> float:
    """||candidate - reference||₂ / ||reference||₂ over all elements (0 = identical)."""
    num = _diff(reference, candidate).double().norm().item()
    den = reference.double().norm().item()
    return num / den if den else (0.0 if num == 0 else math.inf)


def sqnr_db(reference: torch.Tensor, candidate: torch.Tensor) -> float:
    """Signal-to-quantisation-noise ratio in dB: 10·log10(Σref² / Σ(ref − cand)²); inf when equal."""
    signal = reference.double().pow(2).sum().item()
    noise = (candidate.double() - reference.double()).pow(2).sum().item()
    return sqnr_from_powers(signal, noise)


def sqnr_from_powers(signal: float, noise: float) -> float:
    """10·log10(signal / noise) in dB from summed squares: inf when noise is 0, -inf when the signal
    is 0 or the noise infinite (an overflowed candidate), NaN when the noise is NaN."""
    if noise == 0:
        return math.inf
    if math.isnan(noise):
        return math.nan
    return 10 * math.log10(signal / noise) if signal and noise != math.inf else -math.inf


def cosine_similarity(reference: torch.Tensor, candidate: torch.Tensor) -> float:
    """Cosine of the angle between the two tensors, flattened (1 = same direction)."""
    ref, cand = reference.double().flatten(), candidate.double().flatten()
    denom = ref.norm().item() * cand.norm().item()
    return (ref @ cand).item() / denom if denom else math.nan


def kl_divergence(reference: torch.Tensor, candidate: torch.Tensor) -> float:
    """Mean over positions of KL(softmax(reference) ‖ softmax(candidate)) in nats; last dim = classes."""
    ref_logp = torch.log_softmax(reference.double(), dim=-1)
    cand_logp = torch.log_softmax(candidate.double(), dim=-1)
    return (ref_logp.exp() * (ref_logp - cand_logp)).sum(-1).mean().item()


def top1_agreement(reference: torch.Tensor, candidate: torch.Tensor) -> float:
    """Share of positions (0..1) where both pick the same arg-max class."""
    return (reference.argmax(-1) == candidate.argmax(-1)).double().mean().item()


@dataclass(frozen=True)
class OutputMetrics:
    """Every metric of one candidate output against the reference output.

    ``kl_divergence`` and ``top1_agreement`` are None unless the output is logits. ``status`` is
    ``"ok"`` or says how many NaN / inf values the candidate produced (metrics then include them).
    """

    mean_abs_diff: float
    max_abs_diff: float
    relative_error: float
    sqnr_db: float
    cosine_similarity: float
    kl_divergence: float | None = None
    top1_agreement: float | None = None
    nan_count: int = 0
    inf_count: int = 0

    @property
    def status(self) -> str:
        if self.nan_count or self.inf_count:
            return f"non-finite output: {self.nan_count} NaN, {self.inf_count} inf"
        return "ok"


def output_metrics(reference: torch.Tensor, candidate: torch.Tensor, logits: bool = False) -> OutputMetrics:
    """Compute :class:`OutputMetrics`; ``logits=True`` adds KL divergence and top-1 agreement."""
    if reference.shape != candidate.shape:
        raise InputError(f"output shapes differ: reference {tuple(reference.shape)}, "
                         f"candidate {tuple(candidate.shape)}: compare models with the same output")
    extra = {}
    if logits:
        extra = {"kl_divergence": kl_divergence(reference, candidate),
                 "top1_agreement": top1_agreement(reference, candidate)}
    return OutputMetrics(mean_abs_diff(reference, candidate), max_abs_diff(reference, candidate),
                         relative_error(reference, candidate), sqnr_db(reference, candidate),
                         cosine_similarity(reference, candidate), **extra,
                         nan_count=int(candidate.isnan().sum()), inf_count=int(candidate.isinf().sum()))


def select_output(output: object, name: str | None = None) -> torch.Tensor:
    """The tensor to compare from a model's output: the tensor itself, or a named field of an
    output object / dict (default: ``logits``, else ``last_hidden_state``, else the first tensor)."""
    if isinstance(output, torch.Tensor):
        return output
    fields = dict(output) if isinstance(output, Mapping) else {}
    if not fields and isinstance(output, tuple | list):
        fields = {str(i): v for i, v in enumerate(output)}
    for key in ([name] if name else ["logits", "last_hidden_state", *fields]):
        if isinstance(fields.get(key), torch.Tensor):
            return fields[key]
    raise InputError(f"model output has no tensor {name!r}: choose --output from "
                     f"{', '.join(fields) or '(none: the output holds no tensors)'}")


def is_logits_output(output: object, output_kind: str) -> bool:
    if output_kind != "auto":
        return output_kind == "logits"
    return isinstance(output, Mapping) and "logits" in output


@torch.inference_mode()
def run_model(model: nn.Module, inputs: torch.Tensor | Mapping[str, torch.Tensor]) -> object:
    """One forward pass; a mapping of inputs is passed as keyword arguments."""
    return model(**inputs) if isinstance(inputs, Mapping) else model(inputs)


@dataclass(frozen=True)
class VariantResult:
    """One variant's size and output metrics against the reference."""

    name: str
    dtype: str
    footprint_bytes: int
    metrics: OutputMetrics
    output: torch.Tensor = field(repr=False, compare=False)


@dataclass
class ComparisonResult(TableMixin):
    """Reference output plus one :class:`VariantResult` per variant, in the order given."""

    reference_footprint_bytes: int
    variants: list[VariantResult]
    logits: bool
    reference_output: torch.Tensor = field(repr=False, default=None)

    def to_table(self) -> Table:
        columns = ["variant", "dtype", "bytes", "x fp32", "mean_abs_diff", "max_abs_diff", "rel_error",
                   "sqnr_db", "cosine"] + (["kl_div", "top1_agree"] if self.logits else []) + ["status"]
        return Table("Comparison against the reference", columns, [self._row(v) for v in self.variants])

    def _row(self, variant: VariantResult) -> list:
        m = variant.metrics
        ref_bytes = self.reference_footprint_bytes
        ratio = variant.footprint_bytes / ref_bytes if ref_bytes else 0
        row = [variant.name, variant.dtype, variant.footprint_bytes, round(ratio, 3), m.mean_abs_diff,
               m.max_abs_diff, m.relative_error, m.sqnr_db, m.cosine_similarity]
        return row + ([m.kl_divergence, m.top1_agreement] if self.logits else []) + [m.status]


def compare_models(reference: nn.Module, variants: Mapping[str, nn.Module],
                   inputs: torch.Tensor | Mapping[str, torch.Tensor], *, output_name: str | None = None,
                   output_kind: str = "auto") -> ComparisonResult:
    """Run the same inputs through ``reference`` and every variant and measure how far each moved.

    Args:
        reference: the model taken as truth (usually float32).
        variants: display name -> model (e.g. from :func:`dtypelab.cast_model`).
        inputs: a tensor (first positional argument) or a mapping of keyword arguments.
        output_name: which field of an output object to compare (default: logits / last_hidden_state).
        output_kind: ``"logits"``, ``"hidden"`` or ``"auto"`` (logits when the output has a ``logits`` field).

    Returns:
        A :class:`ComparisonResult` whose rows hold each variant's footprint and :class:`OutputMetrics`.
    """
    raw = run_model(reference, inputs)
    ref_out, logits = select_output(raw, output_name), is_logits_output(raw, output_kind)
    rows = [_variant_result(name, model, inputs, ref_out, output_name, logits)
            for name, model in variants.items()]
    return ComparisonResult(inspect_model(reference).footprint_bytes, rows, logits, ref_out)


def _variant_result(name: str, model: nn.Module, inputs, ref_out: torch.Tensor,
                    output_name: str | None, logits: bool) -> VariantResult:
    out = select_output(run_model(model, inputs), output_name)
    info = inspect_model(model)
    dtypes = "+".join(s.dtype for s in info.by_dtype)
    return VariantResult(name, dtypes, info.footprint_bytes, output_metrics(ref_out, out, logits), out)


# ---- the same metrics in bounded memory ----------------------------------------------------------

_CHUNK_ELEMENTS = 1 << 18  # 2 MiB of float64 per operand while measuring


class ErrorSums:
    """Running sums from which every :class:`OutputMetrics` field (but KL / top-1) follows.

    Feeding a tensor pair in chunks gives the same numbers as the whole-tensor metrics in
    this module while holding only ``_CHUNK_ELEMENTS`` float64 values per operand.
    """

    def __init__(self) -> None:
        self.numel = 0
        self.nan_count = self.inf_count = 0
        self.sum_abs_diff = self.sum_sq_diff = self.sum_sq_ref = self.sum_sq_cand = self.sum_dot = 0.0
        self.max_abs_diff = -math.inf
        self.reference_absmax = 0.0

    def add(self, reference: torch.Tensor, candidate: torch.Tensor) -> None:
        """Accumulate one (reference, candidate) pair of equal shape, chunk by chunk."""
        if reference.shape != candidate.shape:
            raise InputError(f"layer output shapes differ: reference {tuple(reference.shape)}, candidate "
                             f"{tuple(candidate.shape)}: compare variants of the same architecture")
        ref, cand = reference.detach().reshape(-1), candidate.detach().reshape(-1)
        for start in range(0, ref.numel(), _CHUNK_ELEMENTS):
            self._add_chunk(ref[start:start + _CHUNK_ELEMENTS].double(),
                            cand[start:start + _CHUNK_ELEMENTS].double())

    def _add_chunk(self, ref: torch.Tensor, cand: torch.Tensor) -> None:
        diff = (cand - ref).abs()
        self.numel += ref.numel()
        self.nan_count += int(cand.isnan().sum())
        self.inf_count += int(cand.isinf().sum())
        self.sum_abs_diff += diff.sum().item()
        self.sum_sq_diff += diff.pow(2).sum().item()
        self.sum_sq_ref += ref.pow(2).sum().item()
        self.sum_sq_cand += cand.pow(2).sum().item()
        self.sum_dot += (ref * cand).sum().item()
        chunk_max = diff.max().item()
        self.max_abs_diff = chunk_max if math.isnan(chunk_max) else max(self.max_abs_diff, chunk_max)
        self.reference_absmax = max(self.reference_absmax, ref.abs().max().item())

    def metrics(self, **extra: float | None) -> OutputMetrics:
        """The accumulated :class:`OutputMetrics` (``extra`` adds kl_divergence / top1_agreement)."""
        noise, signal = self.sum_sq_diff, self.sum_sq_ref
        rel = math.sqrt(noise) / math.sqrt(signal) if signal else (0.0 if noise == 0 else math.inf)
        denom = math.sqrt(signal) * math.sqrt(self.sum_sq_cand)
        return OutputMetrics(self.sum_abs_diff / max(self.numel, 1), self.max_abs_diff, rel,
                             sqnr_from_powers(signal, noise),
                             self.sum_dot / denom if denom else math.nan, **extra,
                             nan_count=self.nan_count, inf_count=self.inf_count)


def measure(reference: torch.Tensor, candidate: torch.Tensor, logits: bool = False) -> OutputMetrics:
    """:func:`output_metrics` in bounded memory: KL and top-1 are taken over chunks
    of positions with compare's own functions and averaged by position count (both are means)."""
    sums = ErrorSums()
    sums.add(reference, candidate)
    if not logits:
        return sums.metrics()
    classes = reference.shape[-1]
    ref, cand = reference.reshape(-1, classes), candidate.reshape(-1, classes)
    rows = max(1, _CHUNK_ELEMENTS // classes)
    kl = top1 = 0.0
    for start in range(0, ref.shape[0], rows):
        r, c = ref[start:start + rows], cand[start:start + rows]
        kl += kl_divergence(r, c) * r.shape[0]
        top1 += top1_agreement(r, c) * r.shape[0]
    count = max(ref.shape[0], 1)
    return sums.metrics(kl_divergence=kl / count, top1_agreement=top1 / count)
