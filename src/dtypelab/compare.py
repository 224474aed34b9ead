"""How far a candidate's outputs move from the reference's: the metrics and the comparison run.

Every metric takes ``reference`` and ``candidate`` tensors of one shape. Differences are taken in
float32, as the seed notebook does (``(logits_bf16 - logits_fp32).abs().mean()``), so its printed
numbers are reproduced to the last digit; sums of squares use float64 so large tensors stay exact.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from .errors import InputError
from .inspection import inspect_model
from .report import Table, TableMixin, format_cell


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
    return _ratio(_diff(reference, candidate).double().norm().item(), reference.double().norm().item())


def _ratio(error_norm: float, reference_norm: float) -> float:
    """error / reference norm; against an all-zero reference: 0 when equal, inf when not, NaN for NaN."""
    if reference_norm:
        return error_norm / reference_norm
    return 0.0 if error_norm == 0 else math.inf if error_norm > 0 else math.nan


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
    return _kl_rows(ref_logp, torch.log_softmax(candidate.double(), dim=-1)).mean().item()


def _kl_rows(ref_logp: torch.Tensor, cand_logp: torch.Tensor) -> torch.Tensor:
    """KL(p ‖ q) per row from log-probabilities ``(..., classes)``: classes with p = 0 add nothing
    (0·log 0 = 0), so logits masked to -inf in both models give 0 there, not NaN (-inf minus -inf)."""
    terms = ref_logp.exp() * (ref_logp - cand_logp)
    return torch.where(ref_logp == -math.inf, 0.0, terms).sum(-1)


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
    return _select_output(output, name)[1]


def _select_output(output: object, name: str | None) -> tuple[str, torch.Tensor]:
    if isinstance(output, torch.Tensor) and name in (None, "output"):
        return "output", output
    fields = dict(output) if isinstance(output, Mapping) else {}
    if not fields and isinstance(output, tuple | list):
        fields = {str(i): v for i, v in enumerate(output)}
    for key in ([name] if name else ["logits", "last_hidden_state", *fields]):
        if isinstance(fields.get(key), torch.Tensor):
            return key, fields[key]
    names = ", ".join(k for k, v in fields.items() if isinstance(v, torch.Tensor))
    raise InputError(f"model output has no tensor {name!r}: choose --output from "
                     f"{names or '(none: the model returns one tensor; leave --output out)'}")


def is_logits_output(output: object, output_kind: str) -> bool:
    if output_kind != "auto":
        return output_kind == "logits"
    return isinstance(output, Mapping) and "logits" in output


def valid_positions(output: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """The rows of a per-token output ``(batch, seq, ...)`` where ``attention_mask`` is 1, as
    ``(positions, ...)``; other outputs (pooled, or no mask) are returned whole.

    Padding positions hold whatever the model computes for pad tokens; they are no part of any text,
    so every metric leaves them out.
    """
    if attention_mask is None or output.dim() < 3 or tuple(output.shape[:2]) != tuple(attention_mask.shape):
        return output
    return output[attention_mask.to(output.device).bool()]


def mean_pooled(hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Sentence embeddings ``(batch, hidden)`` in float64: the mean of ``hidden`` ``(batch, seq, hidden)``
    over real tokens, as sentence-transformers pools all-MiniLM-L6-v2."""
    weights = (torch.ones(hidden.shape[:2]) if attention_mask is None else attention_mask).to(hidden.device)
    weights = weights.double().unsqueeze(-1)  # (batch, seq, 1)
    return (hidden.double() * weights).sum(1) / weights.sum(1).clamp(min=1)


def pooled_cosines(reference: torch.Tensor, candidate: torch.Tensor,
                   attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sentence cosine ``(batch,)`` between the mean-pooled embeddings of two hidden-state outputs."""
    return torch.nn.functional.cosine_similarity(mean_pooled(reference, attention_mask),
                                                 mean_pooled(candidate, attention_mask), dim=-1)


@dataclass(frozen=True)
class NextTokenMetrics:
    """llama.cpp's ``--kl-divergence`` report of a causal LM against its reference, over every
    position whose next token is part of the text (padding excluded).

    KL divergences are KL(reference ‖ candidate) of the next-token distributions, in nats.
    ``same_top_p`` is the share of positions where both pick the same most likely token. ``delta_p``
    is p_candidate − p_reference of the reference's most likely token. ``ln_ppl_ratio`` is
    ln(PPL(candidate)/PPL(reference)) on the input text: the mean change of the actual next token's
    negative log-likelihood. ``*_stderr`` are standard errors of the means; the median and p99
    interpolate between positions (``torch.quantile``).
    """

    positions: int
    kl_mean: float
    kl_stderr: float
    kl_median: float
    kl_p99: float
    kl_max: float
    same_top_p: float
    same_top_p_stderr: float
    delta_p_mean: float
    delta_p_rms: float
    ln_ppl_ratio: float
    ln_ppl_ratio_stderr: float


NEXT_TOKEN_CHUNK = 256  # positions per float64 block: bounds memory at 256 x vocab x 8 bytes per copy


def next_token_metrics(reference: torch.Tensor, candidate: torch.Tensor, input_ids: torch.Tensor,
                       attention_mask: torch.Tensor | None = None) -> NextTokenMetrics:
    """Compare two causal LMs' logits ``(batch, seq, vocab)`` on the text ``input_ids`` ``(batch, seq)``.

    Position t's logits predict token t+1; a position counts when both t and t+1 are real tokens.
    Computed in float64, a block of positions at a time.
    """
    if reference.shape != candidate.shape or reference.shape[:2] != input_ids.shape:
        raise InputError(f"logits {tuple(candidate.shape)} do not match token ids {tuple(input_ids.shape)}: "
                         "compare the logits output of a causal LM")
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
    valid = (mask[:, 1:].bool() & mask[:, :-1].bool()).to(reference.device)  # (batch, seq-1)
    targets = input_ids[:, 1:].to(reference.device)[valid]  # (positions,)
    ref, cand = reference[:, :-1][valid], candidate[:, :-1][valid]  # (positions, vocab)
    if not len(targets):
        raise InputError("the input has no next token to predict: give texts of at least two tokens")
    blocks = [slice(i, i + NEXT_TOKEN_CHUNK) for i in range(0, len(targets), NEXT_TOKEN_CHUNK)]
    parts = [_next_token_block(ref[b], cand[b], targets[b]) for b in blocks]
    kl, same, delta_p, delta_nll = (torch.cat(column) for column in zip(*parts, strict=True))
    median, p99 = kl.quantile(0.5).item(), kl.quantile(0.99).item()
    return NextTokenMetrics(len(targets), *_mean_stderr(kl), median, p99, kl.max().item(),
                            *_mean_stderr(same), delta_p.mean().item(), delta_p.pow(2).mean().sqrt().item(),
                            *_mean_stderr(delta_nll))


def _next_token_block(reference: torch.Tensor, candidate: torch.Tensor, targets: torch.Tensor) -> tuple:
    ref_logp = torch.log_softmax(reference.double(), dim=-1)  # (block, vocab)
    cand_logp = torch.log_softmax(candidate.double(), dim=-1)
    kl = _kl_rows(ref_logp, cand_logp)
    top = ref_logp.argmax(-1, keepdim=True)
    same = (cand_logp.argmax(-1, keepdim=True) == top).double().squeeze(-1)
    delta_p = (cand_logp.gather(-1, top).exp() - ref_logp.gather(-1, top).exp()).squeeze(-1)
    target = targets.unsqueeze(-1)
    delta_nll = (ref_logp.gather(-1, target) - cand_logp.gather(-1, target)).squeeze(-1)
    return kl, same, delta_p, delta_nll


def _mean_stderr(values: torch.Tensor) -> tuple[float, float]:
    """Mean and its standard error (sample standard deviation / sqrt(n); 0 for a single value)."""
    n = len(values)
    stderr = values.std().item() / math.sqrt(n) if n > 1 else 0.0
    return values.mean().item(), stderr


@torch.no_grad()  # not inference_mode: quanto's int4 tensors fail under it ("version_counter")
def run_model(model: nn.Module, inputs: torch.Tensor | Mapping[str, torch.Tensor]) -> object:
    """One forward pass on :func:`own_inputs` in the model's dtype; a mapping of inputs is passed as
    keyword arguments."""
    inputs = own_inputs(inputs, input_dtype(model))
    return model(**inputs) if isinstance(inputs, Mapping) else model(inputs)


def input_dtype(model: nn.Module) -> torch.dtype | None:
    """The dtype floating inputs (embeddings fed with ``--input-file``) are given to ``model``: its
    first floating parameter's, as a cast model computes in it (None: no floating parameter)."""
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), None)


def own_inputs(inputs: torch.Tensor | Mapping[str, torch.Tensor],
               dtype: torch.dtype | None = None) -> torch.Tensor | dict[str, torch.Tensor]:
    """The inputs with floating tensors copied, in ``dtype`` when given (ids and masks are shared): a
    model that writes into its input would otherwise change the caller's tensors and what the next
    model compared is given."""
    def own(value: object) -> object:
        if not (isinstance(value, torch.Tensor) and value.is_floating_point()):
            return value
        return value.to(dtype, copy=True) if dtype is not None else value.clone()
    return {k: own(v) for k, v in inputs.items()} if isinstance(inputs, Mapping) else own(inputs)


@dataclass(frozen=True)
class FailedVariant:
    """A variant that could not be built (nothing to quantize, a peer that failed): a row with its reason."""

    reason: str


@dataclass(frozen=True)
class VariantResult:
    """One variant's size, speed and output metrics against the reference.

    ``embedding_cosine_mean`` / ``_min``: per-sentence cosine of mean-pooled embeddings (hidden-state
    outputs only). ``next_token``: the causal-LM report (causal LMs only). ``bits_per_element``:
    footprint bits over the reference's element count (scales included). ``latency_ms``: median
    forward time after warm-up (None unless timed); ``latency_ratio``: its ratio to the reference timed
    in alternation with it (load on the machine hits both alike). ``failure``: why there are no metrics.
    """

    name: str
    dtype: str
    footprint_bytes: int
    metrics: OutputMetrics | None
    output: torch.Tensor | None = field(repr=False, compare=False)
    embedding_cosine_mean: float | None = None
    embedding_cosine_min: float | None = None
    next_token: NextTokenMetrics | None = None
    bits_per_element: float | None = None
    latency_ms: float | None = None
    latency_ratio: float | None = None
    failure: str | None = None


@dataclass
class ComparisonResult(TableMixin):
    """Reference output plus one :class:`VariantResult` per variant, in the order given.

    ``output_name`` is the output field compared; ``positions`` how many token positions (or rows)
    entered the metrics and ``padding_positions`` how many padding positions were left out.
    """

    reference_footprint_bytes: int
    variants: list[VariantResult]
    logits: bool
    reference_output: torch.Tensor = field(repr=False, default=None)
    output_name: str = "output"
    positions: int = 0
    padding_positions: int = 0
    reference_latency_ms: float | None = None

    @property
    def has_embeddings(self) -> bool:
        return any(v.embedding_cosine_mean is not None for v in self.variants)

    @property
    def timed(self) -> bool:
        return self.reference_latency_ms is not None

    def to_table(self) -> Table:
        columns = ["variant", "dtype", "bytes", "x fp32", "bits/elem", "mean_abs_diff", "max_abs_diff",
                   "rel_error", "sqnr_db", "cosine"] + (["kl_div", "top1_agree"] if self.logits else [])
        columns += ["emb_cos_mean", "emb_cos_min"] if self.has_embeddings else []
        columns += ["ms", "x fp32 ms"] if self.timed else []
        notes = [f"compared: {self.output_name} {list(self.reference_output.shape)}, {self.positions:,} "
                 f"positions ({self.padding_positions:,} padding positions left out)"]
        if self.timed:
            notes.append(f"reference forward: {self.reference_latency_ms:.3g} ms (median after warm-up)")
        return Table("Comparison against the reference", columns + ["status"],
                     [self._row(v) for v in self.variants], notes)

    def _row(self, variant: VariantResult) -> list:
        ref_bytes = self.reference_footprint_bytes
        ratio = round(variant.footprint_bytes / ref_bytes, 3) if ref_bytes and not variant.failure else None
        row = [variant.name, variant.dtype, None if variant.failure else variant.footprint_bytes, ratio,
               variant.bits_per_element, *_metric_cells(variant.metrics, self.logits)]
        row += [variant.embedding_cosine_mean, variant.embedding_cosine_min] if self.has_embeddings else []
        row += [variant.latency_ms, variant.latency_ratio] if self.timed else []
        return row + [self._status(variant)]

    def _status(self, variant: VariantResult) -> str:
        if variant.failure:
            return f"failed: {variant.failure}"
        status, ratio = variant.metrics.status, variant.latency_ratio
        if ratio is not None and ratio > 1:
            status += f"; slower than fp32 here (x{ratio:.2f})"
        return status

    def to_tables(self) -> list[Table]:
        rows = [_next_token_row(v) for v in self.variants if v.next_token is not None]
        if not rows:
            return [self.to_table()]
        columns = ["variant", "KL mean ± se", "KL median", "KL p99", "KL max", "same top p ± se",
                   "mean Δp", "RMS Δp", "ln(PPL/PPL_ref) ± se"]
        notes = [f"{self.variants[0].next_token.positions:,} next-token positions; KL(reference ‖ variant) "
                 "in nats; Δp: change in the probability of the reference's top token"]
        return [self.to_table(), Table("Next-token report (llama.cpp --kl-divergence)", columns, rows, notes)]


def _metric_cells(m: OutputMetrics | None, logits: bool) -> list:
    if m is None:
        return [None] * (7 if logits else 5)
    row = [m.mean_abs_diff, m.max_abs_diff, m.relative_error, m.sqnr_db, m.cosine_similarity]
    return row + ([m.kl_divergence, m.top1_agreement] if logits else [])


def forward_latency_ms(model: nn.Module, inputs, warmup: int = 2, runs: int = 7) -> float:
    """Median wall time of one forward pass in milliseconds, after ``warmup`` untimed passes."""
    return paired_latency_ms([model], inputs, warmup, runs)[0]


def paired_latency_ms(models: list[nn.Module], inputs, warmup: int = 2, runs: int = 7) -> list[float]:
    """Median forward milliseconds of each model, timed in alternation (round-robin) after warm-up.

    Alternating makes a busy machine slow every model alike, so ratios between them stay meaningful.
    """
    for _ in range(warmup):
        for model in models:
            run_model(model, inputs)
    times: list[list[float]] = [[] for _ in models]
    for _ in range(runs):
        for model, series in zip(models, times, strict=True):
            _synchronize()  # the previous model's queued GPU work must not count against this one
            start = time.perf_counter()
            run_model(model, inputs)
            _synchronize()
            series.append((time.perf_counter() - start) * 1000)
    return [statistics.median(series) for series in times]


def _synchronize() -> None:
    """Wait for queued CUDA kernels (forwards return before a GPU has finished); nothing on CPU."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _pm(mean: float, stderr: float) -> str:
    return f"{format_cell(mean)} ± {format_cell(stderr)}"


def _next_token_row(variant: VariantResult) -> list:
    n = variant.next_token
    return [variant.name, _pm(n.kl_mean, n.kl_stderr), n.kl_median, n.kl_p99, n.kl_max,
            f"{100 * n.same_top_p:.2f}% ± {100 * n.same_top_p_stderr:.2f}%", n.delta_p_mean, n.delta_p_rms,
            _pm(n.ln_ppl_ratio, n.ln_ppl_ratio_stderr)]


def compare_models(reference: nn.Module, variants: Mapping[str, nn.Module | FailedVariant],
                   inputs: torch.Tensor | Mapping[str, torch.Tensor], *, output_name: str | None = None,
                   output_kind: str = "auto", next_token: bool | None = None,
                   timing: bool = False) -> ComparisonResult:
    """Run the same inputs through ``reference`` and every variant and measure how far each moved.

    Args:
        reference: the model taken as truth (usually float32).
        variants: display name -> model (e.g. from :func:`dtypelab.cast_model`), or a
            :class:`FailedVariant` that becomes a row with its reason.
        inputs: a tensor (first positional argument) or a mapping of keyword arguments; an
            ``attention_mask`` in it masks padding out of every metric.
        output_name: which field of an output object to compare (default: logits / last_hidden_state).
        output_kind: ``"logits"``, ``"hidden"`` or ``"auto"`` (logits when the output has a ``logits`` field).
        next_token: add the causal-LM report (default: when ``reference`` is a transformers causal LM
            and the inputs hold ``input_ids``).
        timing: also measure forward latencies (medians after warm-up, each variant timed in
            alternation with the reference) and flag variants slower than the reference.

    Returns:
        A :class:`ComparisonResult` whose rows hold each variant's footprint and :class:`OutputMetrics`,
        plus pooled-embedding cosines for hidden-state outputs and :class:`NextTokenMetrics` for LMs.
    """
    raw = run_model(reference, inputs)
    name, ref_out = _select_output(raw, output_name)
    context = _Context(name, ref_out, is_logits_output(raw, output_kind), *_mask_and_ids(inputs))
    context.next_token = _wants_next_token(next_token, reference, context)
    context.timer = reference if timing else None
    context.numel = sum(s.numel for s in inspect_model(reference).by_dtype)
    rows = [_variant_result(vname, model, inputs, context) for vname, model in variants.items()]
    compared = valid_positions(ref_out, context.mask)
    positions = compared.shape[0] * compared.shape[1] if compared.dim() >= 3 else compared.shape[0]
    padding = ref_out.shape[0] * ref_out.shape[1] - positions if compared is not ref_out else 0
    ref_ms = forward_latency_ms(reference, inputs, warmup=1, runs=5) if timing else None
    return ComparisonResult(inspect_model(reference).footprint_bytes, rows, context.logits, ref_out, name,
                            positions, padding, ref_ms)


@dataclass
class _Context:
    """What every variant is measured against."""

    name: str
    reference: torch.Tensor
    logits: bool
    mask: torch.Tensor | None
    input_ids: torch.Tensor | None
    next_token: bool = False
    timer: nn.Module | None = None  # the reference, when latencies are measured
    numel: int = 0  # the reference's elements, for bits per element


def _mask_and_ids(inputs: torch.Tensor | Mapping[str, torch.Tensor]) -> tuple:
    if isinstance(inputs, Mapping):
        return inputs.get("attention_mask"), inputs.get("input_ids")
    return None, (inputs if not inputs.is_floating_point() else None)


def _wants_next_token(requested: bool | None, reference: nn.Module, context: _Context) -> bool:
    from .models import model_kind

    if requested is not None:
        return requested
    return (context.logits and context.input_ids is not None and context.reference.dim() == 3
            and context.reference.shape[1] > 1 and model_kind(reference) == "causal-lm")


def _variant_result(name: str, model: nn.Module | FailedVariant, inputs, context: _Context) -> VariantResult:
    if isinstance(model, FailedVariant):
        return VariantResult(name, "", 0, None, None, failure=model.reason)
    try:
        out = select_output(run_model(model, inputs), context.name)
    except (RuntimeError, NotImplementedError, TypeError) as exc:  # e.g. a peer's kernel missing here
        reason = f"forward failed: {type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:200]}"
        return VariantResult(name, "", 0, None, None, failure=reason)
    info = inspect_model(model)
    dtypes = "+".join(s.dtype for s in info.by_dtype)
    ref, mask = context.reference, context.mask
    metrics = output_metrics(valid_positions(ref, mask), valid_positions(out, mask), context.logits)
    extra: dict = {}
    if context.name == "last_hidden_state" and not context.logits:
        cosines = pooled_cosines(ref, out, mask)
        extra = {"embedding_cosine_mean": cosines.mean().item(), "embedding_cosine_min": cosines.min().item()}
    if context.next_token:
        extra["next_token"] = next_token_metrics(ref, out, context.input_ids, mask)
    return VariantResult(name, dtypes, info.footprint_bytes, metrics, out, **extra,
                         **_size_and_speed(model, inputs, info.footprint_bytes, context))


def _size_and_speed(model: nn.Module, inputs, footprint_bytes: int, context: _Context) -> dict:
    """Bits per reference element and, when timing, latency beside the reference's."""
    extra = {"bits_per_element": footprint_bytes * 8 / context.numel if context.numel else None}
    if context.timer is not None:
        ref_ms, ms = paired_latency_ms([context.timer, model], inputs, warmup=1, runs=5)
        extra |= {"latency_ms": ms, "latency_ratio": round(ms / ref_ms, 3) if ref_ms else None}
    return extra


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
        self.max_abs_diff = _max_keeping_nan(self.max_abs_diff, diff.max().item())
        self.reference_absmax = _max_keeping_nan(self.reference_absmax, ref.abs().max().item())

    def metrics(self, **extra: float | None) -> OutputMetrics:
        """The accumulated :class:`OutputMetrics` (``extra`` adds kl_divergence / top1_agreement)."""
        noise, signal = self.sum_sq_diff, self.sum_sq_ref
        rel = _ratio(math.sqrt(noise), math.sqrt(signal))
        denom = math.sqrt(signal) * math.sqrt(self.sum_sq_cand)
        return OutputMetrics(self.sum_abs_diff / max(self.numel, 1), self.max_abs_diff, rel,
                             sqnr_from_powers(signal, noise),
                             self.sum_dot / denom if denom else math.nan, **extra,
                             nan_count=self.nan_count, inf_count=self.inf_count)


def _max_keeping_nan(running: float, chunk: float) -> float:
    """max() that stays NaN once either side is NaN, as torch's max over the whole tensor does
    (Python's max(x, nan) returns x)."""
    return math.nan if math.isnan(running) or math.isnan(chunk) else max(running, chunk)


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
