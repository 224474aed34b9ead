"""What calibration measures of a layer's inputs, and the layer output error computed from it.

Quant stage: builds on :mod:`dtypelab.quant.qtensor`. GPTQ and AWQ (:mod:`dtypelab.quant.gptq`,
:mod:`dtypelab.quant.awq`) see a layer's calibration inputs X (tokens x in) only through
:class:`InputStats`: the Hessian of the layer's squared output error, ``H = 2/n XᵀX`` (float32, one matmul
per batch), and the mean magnitude of each input channel. The output error of a weight change ΔW on those
inputs is then ``tr(ΔW H ΔWᵀ) / 2`` per token, so neither algorithm keeps the activations themselves.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..formats import NumberFormat
from .qtensor import QuantizedTensor, _encode_blocks, _encode_reading_back, _scaled, _store_codes


@dataclass
class InputStats:
    """Running sums over a layer's calibration inputs: ``Σ xxᵀ`` and ``Σ |x|`` (float32), token count.

    ``add`` takes any (..., in) tensor, so a batch of windows is one matmul."""

    features: int
    outer: torch.Tensor = field(init=False)
    abs_sum: torch.Tensor = field(init=False)
    tokens: int = 0

    def __post_init__(self) -> None:
        self.outer = torch.zeros(self.features, self.features)
        self.abs_sum = torch.zeros(self.features)

    def add(self, inputs: torch.Tensor) -> None:
        """Accumulate one batch of inputs (..., in), in float32 on the CPU."""
        rows = inputs.detach().reshape(-1, self.features).float().cpu()
        self.outer.addmm_(rows.t(), rows)
        self.abs_sum.add_(rows.abs().sum(0))
        self.tokens += rows.shape[0]

    @property
    def hessian(self) -> torch.Tensor:
        """``2/n Σ xxᵀ`` (in, in): the Hessian of the layer's summed squared output error per token."""
        return self.outer * (2.0 / max(self.tokens, 1))

    @property
    def abs_mean(self) -> torch.Tensor:
        """Mean |x| per input channel (in,): AWQ's measure of a channel's salience."""
        return self.abs_sum / max(self.tokens, 1)


def output_error(delta: torch.Tensor, hessian: torch.Tensor) -> float:
    """``tr(ΔW H ΔWᵀ)``: twice the summed squared output error per token of a weight change (out, in)."""
    return float(((delta @ hessian) * delta).sum())


def output_sqnr_db(weight: torch.Tensor, candidate: torch.Tensor, hessian: torch.Tensor) -> float:
    """SQNR (dB) of the layer's outputs on its calibration inputs: candidate weights against float ones
    (bias cancels). inf when the outputs are equal."""
    noise = output_error(candidate - weight, hessian)
    signal = output_error(weight, hessian)
    if noise <= 0:
        return math.inf
    return 10.0 * math.log10(max(signal, 1e-300) / noise)


def dequantized_blocks(blocks: torch.Tensor, fmt: NumberFormat, decoded: torch.Tensor,
                       zero_point: torch.Tensor | None) -> torch.Tensor:
    """``blocks`` (rows, blocks, block) rounded onto their codes with float32 steps ``decoded`` (and zero
    points), and read back: the values the stored tensor will hold, computed as qtensor stores them."""
    values = _scaled(blocks, decoded, zero_point)
    _encode_reading_back(values, fmt, decoded, zero_point)
    return values


def tensor_from_values(values: torch.Tensor, fmt: NumberFormat, scale: torch.Tensor,
                       zero_point: torch.Tensor | None, tensor_scale: torch.Tensor | None,
                       decoded: torch.Tensor) -> QuantizedTensor:
    """The :class:`QuantizedTensor` of ``values`` (rows, cols) that already lie on the grid of ``scale``:
    re-encoding them gives back their codes (value / step lands within an ulp of its code)."""
    rows, cols = values.shape
    blocks = values.reshape(rows, scale.shape[1], -1)
    codes = _encode_blocks(blocks, fmt, decoded, zero_point).reshape(rows, cols)
    return QuantizedTensor(fmt, (rows, cols), _store_codes(codes, fmt), scale, zero_point, tensor_scale)
