"""GPTQ (Frantar et al. 2022): one layer's weights quantized column by column, each column's rounding
error pushed onto the columns not yet quantized, weighted by the inverse Hessian of its inputs.

Quant stage: builds on :mod:`dtypelab.quant.hessian` and :mod:`dtypelab.quant.qtensor`. The steps are the
reference implementation's (IST-DASLab/gptq ``gptq.py``, as llm-compressor's ``gptq_quantize`` keeps them):

* dead inputs (``H_ii = 0``: the channel is zero on every calibration token) get ``H_ii = 1`` and their
  weight column is zeroed, so the Hessian is invertible and the column costs nothing;
* damping ``λ = 0.01 · mean(diag H)`` is added to the diagonal; when the Cholesky factorisation still
  fails, λ is raised tenfold (at most :data:`DAMP_RETRIES` times, the λ used is reported) and then the
  layer is refused with a message, never written with NaN weights;
* ``U`` = the upper Cholesky factor of ``H⁻¹``; per column ``q = Q(w)``, ``e = (w − q) / U_ii``,
  ``W[:, i:] −= e ⊗ U[i, i:]``, in lazy blocks of :data:`BLOCK_SIZE` columns: inside a block a rank-1
  update of the block, after it one matmul for every later column;
* group scales (and zero points) are chosen when the first column of a group is reached, from the
  weights as updated by then — including the lazy block's pending update of columns past the block, which
  the reference leaves out when a group straddles a block end — with the format's own rule (absmax, or
  ``:mse``'s clip search); channel scales from the whole row before the first column. No act-order, so
  no ``g_idx`` is stored.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import InputError
from ..formats import Granularity, NumberFormat
from .hessian import dequantized_blocks, tensor_from_values
from .qtensor import QuantizedTensor, _choose_scales, _decoded_scale, _tensor_scale

BLOCK_SIZE = 128  # columns per lazy batch update (the reference's blocksize)
DAMP_RATIO = 0.01  # λ as a fraction of the mean Hessian diagonal (the reference's percdamp)
DAMP_RETRIES = 3  # tenfold increases of λ tried when the Cholesky factorisation fails


@dataclass(frozen=True)
class GptqResult:
    """A layer quantized by GPTQ: its tensor, the damping used and how many inputs were dead."""

    qtensor: QuantizedTensor
    damp_ratio: float
    dead_inputs: int


def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, fmt: NumberFormat, *,
                  block_size: int = BLOCK_SIZE, damp_ratio: float = DAMP_RATIO) -> GptqResult:
    """Quantize ``weight`` (out, in) to ``fmt`` by GPTQ with the input Hessian ``hessian`` (in, in).

    Raises:
        InputError: a group size that does not divide the row, non-finite weights or Hessian, or a
            Hessian that no damping makes positive definite.
    """
    w = _checked_weight(weight, hessian, fmt)
    h = hessian.detach().float().clone()
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    upper, used = inverse_cholesky_upper(h, damp_ratio)
    values, scale, zp, tensor_scale, decoded = _quantize_columns(w, upper, fmt, block_size)
    if not torch.isfinite(values).all():
        raise InputError("GPTQ produced non-finite weights (an ill-conditioned Hessian): raise the damping "
                         "or use more calibration tokens")
    qt = tensor_from_values(values, fmt, scale, zp, tensor_scale, decoded)
    return GptqResult(qt, used, int(dead.sum()))


def inverse_cholesky_upper(hessian: torch.Tensor,
                           damp_ratio: float = DAMP_RATIO) -> tuple[torch.Tensor, float]:
    """(U, damping used): the upper Cholesky factor of ``(H + λI)⁻¹``, λ = ratio · mean diag H, the
    ratio raised tenfold while the factorisation fails (see the module docstring)."""
    if not torch.isfinite(hessian).all():
        raise InputError("the calibration inputs hold NaN or inf: GPTQ needs finite activations; check the "
                         "model's float outputs on the calibration text")
    mean_diag = float(torch.diagonal(hessian).mean())
    ratio = damp_ratio
    for _ in range(DAMP_RETRIES + 1):
        damped = hessian + torch.eye(hessian.shape[0]) * (ratio * mean_diag)
        lower, info = torch.linalg.cholesky_ex(damped)
        if int(info) == 0:
            inverse = torch.cholesky_inverse(lower)
            upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
            if int(info) == 0 and torch.isfinite(upper).all():
                return upper, ratio
        ratio *= 10.0
    raise InputError(f"the input Hessian stays singular even with damping {ratio / 10:g} x mean diagonal: "
                     "use more (or more varied) calibration tokens, or RTN for this layer")


def _checked_weight(weight: torch.Tensor, hessian: torch.Tensor, fmt: NumberFormat) -> torch.Tensor:
    """A float32 copy of ``weight`` after the checks ``quantize_tensor`` makes, plus the Hessian's shape."""
    w = weight.detach().float().clone()
    if w.dim() != 2 or hessian.shape != (w.shape[1], w.shape[1]):
        raise InputError(f"GPTQ needs a (out, in) weight and an (in, in) Hessian, got {list(w.shape)} and "
                         f"{list(hessian.shape)}")
    problem = fmt.group_problem(w.shape[1])
    if problem:
        raise InputError(problem)
    if not torch.isfinite(w).all():
        raise InputError("tensor has NaN or inf values, which no scale can represent: fix or exclude it")
    return w


def _quantize_columns(w: torch.Tensor, upper: torch.Tensor, fmt: NumberFormat, block_size: int):
    """The GPTQ loop over lazy blocks; ``w`` is updated in place. Returns (values on the grid, stored
    scales, zero points, tensor scale, float32 steps)."""
    rows, cols = w.shape
    group = fmt.group_size if fmt.granularity == Granularity.GROUP else cols
    tensor_scale = _tensor_scale(w, fmt)
    values = torch.zeros_like(w)
    scales, zps, steps = [], [], []
    for start in range(0, cols, block_size):
        end = min(start + block_size, cols)
        block, errors = w[:, start:end].clone(), torch.zeros(rows, end - start)
        hinv = upper[start:end, start:end]
        for i in range(end - start):
            if (start + i) % group == 0:  # a new group: its scale from the weights as updated so far
                current = _group_columns(w, block, errors, upper, start, i, group)
                scale, zp = _choose_scales(current.reshape(rows, 1, group), fmt, tensor_scale)
                step = _decoded_scale(scale, tensor_scale)
                scales.append(scale), zps.append(zp), steps.append(step)
            column = block[:, i]
            quantized = dequantized_blocks(column.reshape(rows, 1, 1), fmt, step, zp).reshape(rows)
            values[:, start + i] = quantized
            error = (column - quantized) / hinv[i, i]
            block[:, i:].sub_(torch.outer(error, hinv[i, i:]))
            errors[:, i] = error
        w[:, end:].sub_(errors @ upper[start:end, end:])
    zero_point = torch.cat(zps, dim=1) if zps[0] is not None else None
    return values, torch.cat(scales, dim=1), zero_point, tensor_scale, torch.cat(steps, dim=1)


def _group_columns(w: torch.Tensor, block: torch.Tensor, errors: torch.Tensor, upper: torch.Tensor,
                   start: int, i: int, group: int) -> torch.Tensor:
    """The ``group`` columns from ``start + i`` on, with every update so far: those inside the lazy block
    are current; those past it still owe the block's pending update, applied here to them only."""
    inside = block[:, i:i + group]
    need = group - inside.shape[1]
    if need == 0:
        return inside
    end = start + block.shape[1]
    owed = errors[:, :i] @ upper[start:start + i, end:end + need]
    return torch.cat([inside, w[:, end:end + need] - owed], dim=1)
