"""Is a variant's error what its format implies? Noise floors (rounding alone), quality bands, verdicts.

Two kinds of judgement, one per kind of variant:

* a plain cast (fp16, bf16) or a format that also rounds activations (``:a8``, ``:afp8``) is judged
  against its **noise floor**: the error that rounding alone to the format causes, carried through the
  network (one more forward); "within format noise" or "degraded";
* a weight-only scaled format (int8, int4:g128, nf4, mxfp4, nvfp4, fp8_e4m3 with scales) *is* the
  rounding of its weights, so a floor would only measure the variant against itself: it is judged by
  absolute **quality bands** (:data:`QUALITY_BANDS`): near-lossless, close, degraded, broken.

Analysis stage: a floor is one more forward (:func:`~dtypelab.analysis.run.run_model`) of a float32 copy
rounded to the format (:func:`~dtypelab.quant.round_trip`), or of ``quantize_model``'s model.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from ..formats import NumberFormat, get_format
from ..quant import quantize_model, round_trip
from ..tree import map_tensors
from .metrics import OutputMetrics, measure, valid_positions
from .run import run_model, select_output


def noise_floor_db(reference: torch.Tensor, fmt: str | NumberFormat) -> float | None:
    """SQNR (dB) of ``reference`` rounded to ``fmt`` and back: the error storing it in the format alone
    causes, before any arithmetic in the format adds more. inf for an exact format; None for a scaled
    (quantized) format, whose variants keep activations such as ``reference`` in float. Summed in
    chunks: one rounded copy of ``reference`` is the only full-size temporary."""
    fmt = get_format(fmt)
    if fmt.is_quantized:
        return None
    values = reference.detach().float()
    return measure(values, round_trip(values, fmt)).sqnr_db


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
    out as in :func:`dtypelab.compare_models`. Costs one copy of the weights and one forward.

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
            data = round_trip(tensor.detach(), fmt)
            is_param = isinstance(tensor, nn.Parameter)
            memo[id(tensor)] = nn.Parameter(data, requires_grad=False) if is_param else data
    return copy.deepcopy(model, memo)


class _RoundOutput:
    """Forward hook: every floating tensor of a module's output rounded to the format."""

    def __init__(self, fmt: NumberFormat) -> None:
        self.fmt = fmt

    def __call__(self, module: nn.Module, args: tuple, output: object) -> object:
        return map_tensors(output, lambda t: round_trip(t, self.fmt) if t.is_floating_point() else t)


def variant_verdict(metrics: OutputMetrics, floor_db: float | None, top1_threshold: float = 0.9,
                    margin_db: float = NOISE_MARGIN_DB, fmt: str | NumberFormat | None = None,
                    embedding_cosine_min: float | None = None) -> str:
    """Is this variant's output error what its format implies?

    ``broken``: any inf/NaN, or top-1 agreement below ``top1_threshold``. A weight-only scaled ``fmt``
    gets its :func:`quality_band`. Otherwise ``within format noise``: SQNR at least
    ``floor_db - margin_db``, where ``floor_db`` is :func:`rounding_floor_db` (see ``NOISE_MARGIN_DB``);
    ``degraded``: below that; ``unknown`` when there is no floor (a variant of no known format) or the
    floor itself is NaN (rounding alone overflows).
    """
    if metrics.nan_count or metrics.inf_count:
        return "broken"
    if metrics.top1_agreement is not None and metrics.top1_agreement < top1_threshold:
        return "broken"
    if fmt is not None and not judged_by_floor(fmt):
        return quality_band(metrics, embedding_cosine_min)
    if floor_db is None or math.isnan(floor_db) or math.isnan(metrics.sqnr_db):
        return "unknown"
    return "within format noise" if metrics.sqnr_db >= floor_db - margin_db else "degraded"


def row_verdict(metrics: OutputMetrics, floor_db: float | None, model_floor_db: float | None = None,
                margin_db: float = NOISE_MARGIN_DB) -> str:
    """One layer's output, judged as its variant is, so rows and the verdict never contradict.

    Where the layer has a noise floor (plain formats): "within format noise" when its SQNR is within
    ``margin_db`` of the lower of its own floor (its output rounded once) and the model's rounding floor
    (every rounding upstream, carried to the output) — the last row, the model's output, is then judged
    exactly as the variant is. Without a floor (scaled formats): :func:`quality_band` on its SQNR, so a
    3.8 dB layer of an int4 model reads "broken" beside the model's verdict, never "ok".
    """
    if metrics.nan_count or metrics.inf_count:
        return "broken"
    if floor_db is None or math.isnan(floor_db):
        return quality_band(metrics)
    if model_floor_db is not None and not math.isnan(model_floor_db):
        floor_db = min(floor_db, model_floor_db)
    return "within format noise" if metrics.sqnr_db >= floor_db - margin_db else "degraded"


def judged_by_floor(fmt: str | NumberFormat) -> bool:
    """Whether a variant in ``fmt`` is judged against its noise floor (plain casts, and formats that
    round activations too) rather than by :data:`QUALITY_BANDS` (weight-only scaled formats)."""
    fmt = get_format(fmt)
    return not fmt.is_quantized or fmt.activations is not None


@dataclass(frozen=True)
class QualityBand:
    """The least an output must reach to earn ``name``: SQNR (dB), and where the output has them, the
    worst sentence's pooled-embedding cosine, the mean next-token KL (nats) and top-1 agreement."""

    name: str
    min_sqnr_db: float
    min_embedding_cosine: float
    max_kl: float
    min_top1: float


QUALITY_BANDS: tuple[QualityBand, ...] = (
    QualityBand("near-lossless", 30.0, 0.999, 0.01, 0.98),
    QualityBand("close", 20.0, 0.99, 0.05, 0.95),
    QualityBand("degraded", 10.0, 0.90, 0.5, 0.90),
)
"""Best first; anything below the last is ``broken``. Chosen from what people accept and what was
measured here: 30 dB SQNR is an error amplitude of 3% (int8 per-row on all-MiniLM-L6-v2: 30.5 dB, worst
sentence cosine 0.9993; fp8_e4m3 25.0 dB / 0.9978); 20 dB is 10%; int4 g128 / g32, nf4, mxfp4 and
nvfp4 on MiniLM (embeddings quantized too) sit at 10.0–13.2 dB with worst cosines 0.92–0.97, which
retrieval users call degraded; below 10 dB (error a third of the signal) an encoder's neighbours
reorder. KL and top-1 follow llama.cpp's KL-divergence scoreboard: Q8_0 ~0.001 nats, Q4_K_M ~0.03,
Q3 ~0.1, Q2 above 0.5; below 0.9 top-1 agreement a variant is broken whatever its band (the
``top1_threshold`` of :func:`variant_verdict`)."""


def quality_band(metrics: OutputMetrics, embedding_cosine_min: float | None = None) -> str:
    """The best :data:`QUALITY_BANDS` entry whose every applicable threshold the output meets."""
    if metrics.nan_count or metrics.inf_count or math.isnan(metrics.sqnr_db):
        return "broken"
    for band in QUALITY_BANDS:
        ok = metrics.sqnr_db >= band.min_sqnr_db
        ok &= embedding_cosine_min is None or embedding_cosine_min >= band.min_embedding_cosine
        ok &= metrics.kl_divergence is None or metrics.kl_divergence <= band.max_kl
        ok &= metrics.top1_agreement is None or metrics.top1_agreement >= band.min_top1
        if ok:
            return band.name
    return "broken"
