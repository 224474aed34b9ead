"""AWQ (Lin et al. 2023): activation-aware scales and clipping, chosen on a layer's output error.

Quant stage: builds on :mod:`dtypelab.quant.hessian` and :mod:`dtypelab.quant.qtensor`. The two searches
of the reference (mit-han-lab/llm-awq ``auto_scale.py``, ``auto_clip.py``), measured through the input
Hessian instead of re-running the module (the output error of ΔW is ``tr(ΔW H ΔWᵀ)``):

* **scales**: ``s = mean|x|^α`` per input channel, normalised by ``sqrt(max s · min s)``, α on the grid
  0, 1/20 … 19/20; the layers sharing one input (q/k/v, gate/up) are scaled together, their weights
  multiplied by s and the input divided by it — which only works when the producer of that input can
  absorb 1/s (a norm's weight: :mod:`dtypelab.quant.calibrate` folds it and checks the block's outputs
  are unchanged). α = 0 is s = 1: plain round to nearest, so the search never does worse than RTN on
  the calibration inputs.
* **clipping**: per block of the scaled weight, the clip ratio 1.0 … 0.5 (``qtensor.MSE_CLIP_RATIOS``)
  that minimises that block's contribution to the output error, ``Δ_g H_gg Δ_gᵀ`` (the reference's
  per-group output error on its sampled tokens). Applied to every layer, q and k included.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..errors import InputError
from ..formats import NumberFormat
from .hessian import dequantized_blocks, output_error, tensor_from_values
from .qtensor import (
    MSE_CLIP_RATIOS,
    QuantizedTensor,
    _block_stats,
    _blocks,
    _choose_scales,
    _decoded_scale,
    _keep_better,
    _scales_for_clip,
    _tensor_scale,
)

ALPHA_GRID = tuple(i / 20 for i in range(20))  # the reference's n_grid = 20
MIN_ABS_MEAN = 1e-4  # floor on mean|x| before the power: a dead channel keeps a finite scale


@dataclass(frozen=True)
class AwqScales:
    """The scale search's answer for layers sharing an input: α and the per-input-channel scale s."""

    alpha: float
    scales: torch.Tensor  # (in,) float32; weights are multiplied by it, inputs divided


def search_scales(weights: Sequence[torch.Tensor], hessian: torch.Tensor, abs_mean: torch.Tensor,
                  fmt: NumberFormat, grid: Sequence[float] = ALPHA_GRID) -> AwqScales:
    """The α on ``grid`` whose scales minimise the summed output error of ``weights`` (each (out, in),
    all fed the same inputs) rounded to nearest in ``fmt``; ties keep the smaller α."""
    best: tuple[float, float, torch.Tensor] | None = None
    stacked = torch.cat([w.float() for w in weights])  # layers sharing an input: one matmul per α
    for alpha in grid:
        scales = channel_scales(abs_mean, alpha)
        error = output_error(rounded(stacked * scales, fmt) / scales - stacked, hessian)
        if best is None or error < best[0]:
            best = (error, alpha, scales)
    return AwqScales(best[1], best[2])


def channel_scales(abs_mean: torch.Tensor, alpha: float) -> torch.Tensor:
    """``s = mean|x|^α / sqrt(max · min)`` (in,), float32; α = 0 gives ones."""
    if alpha == 0:
        return torch.ones_like(abs_mean, dtype=torch.float32)
    powered = abs_mean.float().clamp(min=MIN_ABS_MEAN).pow(alpha)
    return powered / math.sqrt(float(powered.max()) * float(powered.min()))


def clip_quantize(weight: torch.Tensor, hessian: torch.Tensor, fmt: NumberFormat) -> QuantizedTensor:
    """``weight`` (out, in) quantized with, per block, the clip ratio of least output error on inputs
    with Hessian ``hessian`` (in, in) (see the module docstring)."""
    w = weight.detach().float()
    problem = fmt.group_problem(w.shape[1])
    if problem:
        raise InputError(problem)
    if not (torch.isfinite(w).all() and torch.isfinite(hessian).all()):
        raise InputError("AWQ needs finite weights and calibration activations: check the model's float "
                         "outputs on the calibration text")
    blocks = _blocks(w, fmt)  # (rows, groups, group)
    diagonal = _diagonal_blocks(hessian.float(), blocks.shape[1], blocks.shape[2])
    tensor_scale = _tensor_scale(w, fmt)
    stats = _block_stats(blocks, fmt)
    best = None
    for ratio in MSE_CLIP_RATIOS:
        scale, zp = _scales_for_clip(stats, fmt, tensor_scale, ratio)
        delta = dequantized_blocks(blocks, fmt, _decoded_scale(scale, tensor_scale), zp) - blocks
        by_group = delta.transpose(0, 1)  # (groups, rows, group): one matmul per block column
        error = (torch.bmm(by_group, diagonal) * by_group).sum(-1).t().unsqueeze(-1)  # Δ_g H_gg Δ_gᵀ
        best = (error, scale, zp) if best is None else _keep_better(best, (error, scale, zp))
    scale, zp = best[1], best[2]
    decoded = _decoded_scale(scale, tensor_scale)
    values = dequantized_blocks(blocks, fmt, decoded, zp).reshape(w.shape)
    return tensor_from_values(values, fmt, scale, zp, tensor_scale, decoded)


def scaled_hessian(hessian: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The Hessian of inputs divided by ``scales``: ``diag(1/s) H diag(1/s)``."""
    inverse = 1.0 / scales
    return hessian * inverse[:, None] * inverse[None, :]


def _diagonal_blocks(hessian: torch.Tensor, groups: int, group: int) -> torch.Tensor:
    """(groups, group, group): the Hessian's blocks on the diagonal, one per scale block of a row."""
    return torch.stack([hessian[g * group:(g + 1) * group, g * group:(g + 1) * group] for g in range(groups)])


def rounded(weight: torch.Tensor, fmt: NumberFormat) -> torch.Tensor:
    """``weight`` (out, in) rounded to nearest in ``fmt`` with its own scale rule, as float32 values (the
    stored tensor's, without packing it): the scale search's trial rounding."""
    blocks = _blocks(weight, fmt)
    tensor_scale = _tensor_scale(weight, fmt)
    scale, zp = _choose_scales(blocks, fmt, tensor_scale)
    return dequantized_blocks(blocks, fmt, _decoded_scale(scale, tensor_scale), zp).reshape(weight.shape)
