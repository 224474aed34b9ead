"""Dynamic activation fake-quantization, for the W8A8 specs (``:a8``, ``:afp8``).

Quant stage: builds on :mod:`dtypelab.formats`. Emulated: values are rounded to the activation format
and computed in float, which is what the error of a real W8A8 kernel is made of.
"""

from __future__ import annotations

import torch

from ..formats import E4M3


def quantize_activations(x: torch.Tensor, kind: str | None) -> torch.Tensor:
    """Dynamic activation fake-quantization: ``"int8"`` per token (last dim), ``"fp8"`` per tensor.

    Scales are absmax / 127 per token or absmax / 448 for the whole tensor (all-zero -> scale 1);
    the result is in ``x``'s dtype. None returns ``x`` unchanged.
    """
    if kind is None:
        return x
    xf = x.float()
    if kind == "int8":
        scale = xf.abs().amax(dim=-1, keepdim=True) / 127.0  # (..., 1): one scale per token
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        return (torch.round(xf / scale).clamp(-127, 127) * scale).to(x.dtype)
    scale = xf.abs().amax() / E4M3.max_finite
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return ((xf / scale).to(torch.float8_e4m3fn).float() * scale).to(x.dtype)
