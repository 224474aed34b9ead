"""Two 4-bit codes per byte: element 2k in the low nibble, element 2k+1 in the high nibble.

Quant stage; imports torch only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """(rows, cols) codes (low 4 bits used) -> (rows, ceil(cols / 2)) uint8; odd cols pad with 0."""
    nibbles = (codes.to(torch.int16) & 0xF).to(torch.uint8)
    if nibbles.shape[-1] % 2:
        nibbles = F.pad(nibbles, (0, 1))
    return nibbles[..., 0::2] | (nibbles[..., 1::2] << 4)


def unpack_nibbles(packed: torch.Tensor, cols: int) -> torch.Tensor:
    """Inverse of :func:`pack_nibbles`: (rows, ceil(cols / 2)) uint8 -> (rows, cols) uint8 codes."""
    low, high = packed & 0xF, packed >> 4
    return torch.stack([low, high], dim=-1).reshape(*packed.shape[:-1], -1)[..., :cols]
