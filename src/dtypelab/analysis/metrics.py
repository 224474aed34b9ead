"""How far a candidate's outputs move from the reference's: every metric, whole-tensor and chunked.

Every metric takes ``reference`` and ``candidate`` tensors of one shape. Differences are taken in
float32, as the seed notebook does (``(logits_bf16 - logits_fp32).abs().mean()``), so its printed
numbers are reproduced to the last digit; sums of squares use float64 so large tensors stay exact.

Analysis stage: pure functions of tensors; the SQNR formula is the damage accounting's
(:func:`dtypelab.quant.sqnr_from_powers`), so a model's and a tensor's SQNR are one definition.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import InputError
from ..quant import sqnr_from_powers


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
    negative log-likelihood. ``reference_perplexity`` / ``candidate_perplexity``: exp of the mean
    negative log-likelihood of the actual next tokens under each model (as transformers' loss gives).
    ``*_stderr`` are standard errors of the means; the median and p99 interpolate between positions
    (``torch.quantile``).
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
    reference_perplexity: float
    candidate_perplexity: float


NEXT_TOKEN_CHUNK = 256  # positions per float64 block: bounds memory at 256 x vocab x 8 bytes per copy


def next_token_metrics(reference: torch.Tensor, candidate: torch.Tensor, input_ids: torch.Tensor,
                       attention_mask: torch.Tensor | None = None) -> NextTokenMetrics:
    """Compare two causal LMs' logits ``(batch, seq, vocab)`` on the text ``input_ids`` ``(batch, seq)``.

    Position t's logits predict token t+1; a position counts when both t and t+1 are real tokens.
    Computed in float64, a block of positions at a time (:class:`NextTokenSums` over one batch).
    """
    sums = NextTokenSums()
    sums.add(reference, candidate, input_ids, attention_mask)
    return sums.metrics()


class NextTokenSums:
    """:class:`NextTokenMetrics` fed a batch of windows at a time: the per-position values (KL, same top
    token, Δp, Δ negative log-likelihood; 4 float64 each) are kept, the logits never are, so a text of
    any length is measured holding one batch's logits. Feeding batches gives the same numbers as one
    call on the whole text (every value is per position; quantiles are taken once, at the end)."""

    def __init__(self) -> None:
        self._parts: list[tuple[torch.Tensor, ...]] = []

    def add(self, reference: torch.Tensor, candidate: torch.Tensor, input_ids: torch.Tensor,
            attention_mask: torch.Tensor | None = None) -> None:
        """Accumulate one batch: logits ``(batch, seq, vocab)`` and its ``input_ids`` ``(batch, seq)``."""
        if reference.shape != candidate.shape or reference.shape[:2] != input_ids.shape:
            raise InputError(f"logits {tuple(candidate.shape)} do not match token ids "
                             f"{tuple(input_ids.shape)}: compare the logits output of a causal LM")
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        valid = (mask[:, 1:].bool() & mask[:, :-1].bool()).to(reference.device)  # (batch, seq-1)
        targets = input_ids[:, 1:].to(reference.device)[valid]  # (positions,)
        ref, cand = reference[:, :-1][valid], candidate[:, :-1][valid]  # (positions, vocab)
        for start in range(0, len(targets), NEXT_TOKEN_CHUNK):
            block = slice(start, start + NEXT_TOKEN_CHUNK)
            self._parts.append(tuple(v.cpu() for v in _next_token_block(ref[block], cand[block],
                                                                          targets[block])))

    def metrics(self) -> NextTokenMetrics:
        if not self._parts:
            raise InputError("the input has no next token to predict: give texts of at least two tokens")
        columns = zip(*self._parts, strict=True)
        kl, same, delta_p, ref_nll, cand_nll = (torch.cat(column) for column in columns)
        median, p99 = kl.quantile(0.5).item(), kl.quantile(0.99).item()
        return NextTokenMetrics(len(kl), *_mean_stderr(kl), median, p99, kl.max().item(),
                                *_mean_stderr(same), delta_p.mean().item(),
                                delta_p.pow(2).mean().sqrt().item(), *_mean_stderr(cand_nll - ref_nll),
                                math.exp(ref_nll.mean().item()), math.exp(cand_nll.mean().item()))


def _next_token_block(reference: torch.Tensor, candidate: torch.Tensor, targets: torch.Tensor) -> tuple:
    ref_logp = torch.log_softmax(reference.double(), dim=-1)  # (block, vocab)
    cand_logp = torch.log_softmax(candidate.double(), dim=-1)
    kl = _kl_rows(ref_logp, cand_logp)
    top = ref_logp.argmax(-1, keepdim=True)
    same = (cand_logp.argmax(-1, keepdim=True) == top).double().squeeze(-1)
    delta_p = (cand_logp.gather(-1, top).exp() - ref_logp.gather(-1, top).exp()).squeeze(-1)
    target = targets.unsqueeze(-1)
    ref_nll, cand_nll = (-logp.gather(-1, target).squeeze(-1) for logp in (ref_logp, cand_logp))
    return kl, same, delta_p, ref_nll, cand_nll


def _mean_stderr(values: torch.Tensor) -> tuple[float, float]:
    """Mean and its standard error (sample standard deviation / sqrt(n); 0 for a single value)."""
    n = len(values)
    stderr = values.std().item() / math.sqrt(n) if n > 1 else 0.0
    return values.mean().item(), stderr


_CHUNK_ELEMENTS = 1 << 18  # 2 MiB of float64 per operand while measuring


class ErrorSums:
    """Running sums from which every :class:`OutputMetrics` field (but KL / top-1) follows.

    Feeding a tensor pair in chunks gives the same numbers as the whole-tensor metrics in
    this module while holding only ``_CHUNK_ELEMENTS`` float64 values per operand. Pairs added with
    ``logits=True`` also sum KL and top-1 agreement per position (last dimension = classes), so the
    metrics of a long text fed a batch at a time are those of the whole text.
    """

    def __init__(self) -> None:
        self.numel = 0
        self.nan_count = self.inf_count = 0
        self.sum_abs_diff = self.sum_sq_diff = self.sum_sq_ref = self.sum_sq_cand = self.sum_dot = 0.0
        self.max_abs_diff = -math.inf
        self.reference_absmax = 0.0
        self.logit_rows = 0
        self.sum_kl = self.sum_top1 = 0.0

    def add(self, reference: torch.Tensor, candidate: torch.Tensor, logits: bool = False) -> None:
        """Accumulate one (reference, candidate) pair of equal shape, chunk by chunk (``logits``: also
        KL and top-1 over its rows)."""
        if reference.shape != candidate.shape:
            raise InputError(f"layer output shapes differ: reference {tuple(reference.shape)}, candidate "
                             f"{tuple(candidate.shape)}: compare variants of the same architecture")
        ref, cand = reference.detach().reshape(-1), candidate.detach().reshape(-1)
        for start in range(0, ref.numel(), _CHUNK_ELEMENTS):
            self._add_chunk(ref[start:start + _CHUNK_ELEMENTS].double(),
                            cand[start:start + _CHUNK_ELEMENTS].double())
        if logits:
            self._add_logits(reference.detach(), candidate.detach())

    def _add_logits(self, reference: torch.Tensor, candidate: torch.Tensor) -> None:
        """KL and top-1 summed over rows, ``_CHUNK_ELEMENTS // classes`` rows at a time, with compare's
        own functions (both are means over rows, so sums of row-count-weighted means)."""
        classes = reference.shape[-1]
        ref, cand = reference.reshape(-1, classes), candidate.reshape(-1, classes)
        rows = max(1, _CHUNK_ELEMENTS // classes)
        for start in range(0, ref.shape[0], rows):
            r, c = ref[start:start + rows], cand[start:start + rows]
            self.sum_kl += kl_divergence(r, c) * r.shape[0]
            self.sum_top1 += top1_agreement(r, c) * r.shape[0]
        self.logit_rows += ref.shape[0]

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

    def metrics(self) -> OutputMetrics:
        """The accumulated :class:`OutputMetrics` (KL / top-1 when pairs were added as logits)."""
        extra = {}
        if self.logit_rows:
            extra = {"kl_divergence": self.sum_kl / self.logit_rows,
                     "top1_agreement": self.sum_top1 / self.logit_rows}
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
    """:func:`output_metrics` in bounded memory (:class:`ErrorSums` over one pair): KL and top-1 are
    taken over chunks of positions with compare's own functions and averaged by position count."""
    sums = ErrorSums()
    sums.add(reference, candidate, logits)
    return sums.metrics()
