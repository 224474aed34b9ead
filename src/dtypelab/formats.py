"""Number formats as data: one frozen dataclass per format, one registry, one lookup.

Adding a format is adding an entry to ``_REGISTRY``; nothing else branches on format names.
Floating formats backed by a torch dtype take their figures (max finite, eps, …) from
``torch.finfo`` so they can never drift from what torch computes with.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .errors import UnknownFormatError


@dataclass(frozen=True)
class NumberFormat:
    """A number format an element of a tensor can be stored in.

    Args:
        name: canonical short name (``"bf16"``).
        aliases: other accepted spellings (``"bfloat16"``, ``"torch.bfloat16"``).
        bits: storage bits per element, scales excluded.
        torch_dtype: the torch dtype values are stored in, when torch has one.
        description: one line for tables and help.
    """

    name: str
    bits: int
    torch_dtype: torch.dtype | None
    description: str
    aliases: tuple[str, ...] = field(default=())

    @property
    def is_floating_point(self) -> bool:
        return self.torch_dtype is not None and self.torch_dtype.is_floating_point

    @property
    def max_finite(self) -> float:
        """Largest finite value; anything larger overflows (to inf for IEEE-like formats)."""
        return float(torch.finfo(self.torch_dtype).max)

    @property
    def smallest_normal(self) -> float:
        return float(torch.finfo(self.torch_dtype).smallest_normal)

    @property
    def smallest_subnormal(self) -> float:
        """Smallest positive value; anything below half of it flushes to zero."""
        finfo = torch.finfo(self.torch_dtype)
        mantissa_bits = round(-torch.log2(torch.tensor(finfo.eps)).item())
        return float(finfo.smallest_normal) * 2.0**-mantissa_bits

    @property
    def eps(self) -> float:
        """Gap between 1.0 and the next value: twice the worst relative rounding error."""
        return float(torch.finfo(self.torch_dtype).eps)

    def round_trip(self, tensor: torch.Tensor) -> torch.Tensor:
        """Round ``tensor`` to this format and back to its own dtype (round to nearest even)."""
        return tensor.to(self.torch_dtype).to(tensor.dtype)


_REGISTRY: tuple[NumberFormat, ...] = (
    NumberFormat("fp32", 32, torch.float32, "IEEE 754 single precision",
                 ("float32", "float", "torch.float32")),
    NumberFormat("fp16", 16, torch.float16, "IEEE 754 half precision: 5-bit exponent, max 65504",
                 ("float16", "half", "torch.float16")),
    NumberFormat("bf16", 16, torch.bfloat16, "bfloat16: float32's range, 8-bit mantissa",
                 ("bfloat16", "torch.bfloat16")),
)

_BY_NAME: dict[str, NumberFormat] = {
    alias.lower(): fmt for fmt in _REGISTRY for alias in (fmt.name, *fmt.aliases)
}


def all_formats() -> tuple[NumberFormat, ...]:
    """Every registered format, in registry order."""
    return _REGISTRY


def get_format(spec: str | torch.dtype | NumberFormat) -> NumberFormat:
    """Resolve a name, alias, ``torch.dtype`` or format to its registry entry.

    Example:
        >>> get_format("half").name
        'fp16'
    """
    if isinstance(spec, NumberFormat):
        return spec
    key = str(spec).strip().lower()
    if key in _BY_NAME:
        return _BY_NAME[key]
    known = ", ".join(f.name for f in _REGISTRY)
    raise UnknownFormatError(f"unknown dtype or format {str(spec)!r}: use one of {known} "
                             "(aliases like float16, half, bfloat16 work too)")


def parse_format_list(text: str) -> list[NumberFormat]:
    """Parse a comma-separated list such as ``"fp16,bf16"``; empty items are an error."""
    items = [item.strip() for item in text.split(",")]
    if not all(items):
        raise UnknownFormatError(f"empty item in format list {text!r}: write e.g. 'fp16,bf16'")
    return [get_format(item) for item in items]
