"""Element codecs: how one element of a format maps between a float32 value and an integer code.

Every codec enumerates its codes into a value table (at most 256 entries), so decoding is a table
lookup and encoding is a nearest-value search with an explicit tie rule. That one algorithm serves
minifloats (e4m3, e5m2, e2m1, e8m0), integers and lookup tables (nf4), and is checked bit for bit
against torch and ml_dtypes over every code.

Rounding: round to nearest; a tie goes to the even code (IEEE round-to-nearest-even, since a
minifloat's code LSB is its mantissa LSB and an integer's code LSB is its value LSB). e8m0 has no
mantissa, so both neighbours of a tie are "even": like torch and ml_dtypes it rounds ties up.

Overflow (a value past the largest finite one): ``"saturate"`` clamps to ±max finite (e4m3fn as torch
2.13 casts it, e2m1 as ml_dtypes does), ``"inf"`` gives ±inf (e5m2, IEEE), ``"nan"`` gives NaN (e8m0).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING

from ..lazy import lazy_module

if TYPE_CHECKING:
    import torch
else:
    torch = lazy_module("torch")  # imported when a tensor is touched, not for the registry's figures


def rounding_threshold(max_finite: float, eps: float) -> float:
    """The largest magnitude round-to-nearest still puts on ``max_finite`` of a minifloat or IEEE format
    with that ``eps``: half the top binade's step above it (e4m3fn: 448 + 16; fp16: 65504 + 16). Beyond it
    a value overflows (saturates, or becomes inf / NaN)."""
    return max_finite + 2.0 ** math.floor(math.log2(max_finite)) * eps / 2


@dataclass(frozen=True)
class FloatCodec:
    """A minifloat: sign (optional), ``exp_bits`` exponent bits, ``man_bits`` mantissa bits.

    Args:
        exp_bits, man_bits, bias: the IEEE-style layout; value = (1 + m/2^man) * 2^(e - bias).
        signed: whether there is a sign bit (e8m0 has none).
        nan: ``"ieee"`` (all-ones exponent is inf/NaN), ``"all_ones"`` (only the all-ones code is
            NaN, no inf: the "fn" formats) or ``"none"``.
        subnormals: whether exponent field 0 encodes subnormals and zero (e8m0: no, 2^-127 is code 0).
        overflow: what a value past max finite becomes: ``"saturate"``, ``"inf"`` or ``"nan"``.
        ties: ``"even"`` (RNE) or ``"up"`` (e8m0, see module doc).
    """

    exp_bits: int
    man_bits: int
    bias: int
    signed: bool = True
    nan: str = "all_ones"
    subnormals: bool = True
    overflow: str = "saturate"
    ties: str = "even"

    @property
    def bits(self) -> int:
        """Bits per element code: sign (when signed), exponent and mantissa."""
        return int(self.signed) + self.exp_bits + self.man_bits

    @property
    def kind(self) -> str:
        """Short element name: ``e4m3``, ``e2m1``, ``ue8m0`` (unsigned)."""
        sign = "" if self.signed else "u"
        return f"{sign}e{self.exp_bits}m{self.man_bits}"

    @property
    def _mag_codes(self) -> int:
        return 1 << (self.exp_bits + self.man_bits)

    def _magnitude(self, code: int) -> float:
        """Value of magnitude code ``code`` (sign bit excluded); inf/NaN where the layout says so."""
        exp, man = code >> self.man_bits, code & ((1 << self.man_bits) - 1)
        all_ones_exp = exp == (1 << self.exp_bits) - 1
        if self.nan == "ieee" and all_ones_exp:
            return math.inf if man == 0 else math.nan
        if self.nan == "all_ones" and code == self._mag_codes - 1:
            return math.nan
        if self.subnormals and exp == 0:
            return math.ldexp(man, 1 - self.bias - self.man_bits)
        return math.ldexp(1.0 + man / (1 << self.man_bits), exp - self.bias)

    @cached_property
    def magnitudes(self) -> tuple[float, ...]:
        """Value of every magnitude code, in code order (ascending for finite codes)."""
        return tuple(self._magnitude(code) for code in range(self._mag_codes))

    @cached_property
    def _finite(self) -> tuple[float, ...]:
        return tuple(v for v in self.magnitudes if math.isfinite(v))

    @property
    def max_finite(self) -> float:
        """Largest finite value."""
        return self._finite[-1]

    @property
    def smallest_normal(self) -> float:
        """Smallest positive normal value, 2^(1 - bias) (2^-bias without subnormals)."""
        return math.ldexp(1.0, (1 if self.subnormals else 0) - self.bias)

    @property
    def smallest_subnormal(self) -> float:
        """Smallest positive value (the smallest normal when there are no subnormals)."""
        return next(v for v in self._finite if v > 0)

    @property
    def eps(self) -> float:
        """Gap between 1.0 and the next larger value."""
        return math.ldexp(1.0, -self.man_bits)

    @property
    def has_inf(self) -> bool:
        """Whether the layout has ±inf (IEEE-style all-ones exponent)."""
        return self.nan == "ieee"

    @property
    def has_nan(self) -> bool:
        """Whether any code is NaN."""
        return self.nan != "none"

    @property
    def _overflow_value(self) -> float:
        """Where the next code past max finite would sit if the exponent were unbounded."""
        top = self.max_finite
        exp = math.frexp(top)[1] - 1
        return top + math.ldexp(1.0, exp - self.man_bits)

    @property
    def _special_code(self) -> int:
        """Magnitude code that overflow lands on: inf for "inf", NaN for "nan"."""
        if self.overflow == "inf":
            return self.magnitudes.index(math.inf)
        return self._mag_codes - 1

    def values(self) -> torch.Tensor:
        """float32 value of every code 0 .. 2^bits - 1 (index = code)."""
        mags = torch.tensor(self.magnitudes, dtype=torch.float32)
        return torch.cat([mags, -mags]) if self.signed else mags

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes (any integer dtype) -> float32 values, by table lookup."""
        return self.values().to(codes.device)[codes.long() & ((1 << self.bits) - 1)]

    def encode(self, values: torch.Tensor) -> torch.Tensor:
        """float values -> uint8 codes, round to nearest (ties as ``self.ties``), overflow as documented."""
        x = values.float()
        grid = torch.tensor((*self._finite, self._overflow_value), dtype=torch.float64, device=x.device)
        idx = nearest_index(x.abs(), grid, self.ties)
        idx = self._apply_overflow(idx, len(self._finite))
        idx = torch.where(x.isnan(), self._mag_codes - 1, idx)
        if not self.signed:  # no sign bit: negatives (and zero, when it has none) are NaN
            invalid = x <= 0 if self._finite[0] > 0 else x < 0
            return torch.where(invalid, self._mag_codes - 1, idx).to(torch.uint8)
        sign = torch.signbit(x).to(torch.int64) << (self.bits - 1)
        return (idx | sign).to(torch.uint8)

    def _apply_overflow(self, idx: torch.Tensor, overflow_idx: int) -> torch.Tensor:
        """Indices past the last finite value become the saturated or special magnitude code."""
        target = overflow_idx - 1 if self.overflow == "saturate" else self._special_code
        return torch.where(idx >= overflow_idx, target, idx)


@dataclass(frozen=True)
class IntCodec:
    """A two's-complement (``signed``) or unsigned integer of ``bits`` bits.

    ``restricted`` drops the most negative code (int8: -127..127) so a symmetric scale maps ±absmax
    onto ±max exactly; encode clamps (saturates) to the allowed range.
    """

    int_bits: int
    signed: bool = True
    restricted: bool = True

    @property
    def bits(self) -> int:
        """Bits per element code."""
        return self.int_bits

    @property
    def kind(self) -> str:
        """Short element name: ``int8``, ``uint4`` ..."""
        return f"{'' if self.signed else 'u'}int{self.int_bits}"

    @property
    def max_finite(self) -> float:
        """Largest value: 2^(bits-1) - 1 signed, 2^bits - 1 unsigned."""
        return float((1 << (self.int_bits - self.signed)) - 1)

    @property
    def min_value(self) -> float:
        """Smallest value: -max (restricted), -max - 1 (two's complement), 0 (unsigned)."""
        if not self.signed:
            return 0.0
        return -self.max_finite if self.restricted else -self.max_finite - 1

    smallest_normal = 1.0
    smallest_subnormal = 1.0
    eps = 1.0
    has_inf = False
    has_nan = False

    def values(self) -> torch.Tensor:
        """float32 value of every code 0 .. 2^bits - 1 (two's complement when signed)."""
        codes = torch.arange(1 << self.int_bits, dtype=torch.float32)
        if self.signed:
            codes = torch.where(codes > self.max_finite, codes - (1 << self.int_bits), codes)
        return codes

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes (their low ``bits`` bits) -> float32 integer values: the :meth:`values` table, computed
        (two's complement sign-extension) rather than looked up, which needs no int64 index copy."""
        low = codes.to(torch.int16) & ((1 << self.int_bits) - 1)
        if self.signed:
            half = 1 << (self.int_bits - 1)
            low = (low ^ half) - half
        return low.float()

    def encode(self, values: torch.Tensor) -> torch.Tensor:
        """Round half to even, clamp to [min_value, max_finite]; returns int16 integer values."""
        return torch.round(values.float()).clamp_(self.min_value, self.max_finite).to(torch.int16)


@dataclass(frozen=True)
class TableCodec:
    """A signed lookup table of at most 16 sorted values, e.g. NF4's normal quantiles on [-1, 1]."""

    table: tuple[float, ...]
    label: str

    @property
    def bits(self) -> int:
        """Bits to index every table entry."""
        return max(1, (len(self.table) - 1).bit_length())

    @property
    def kind(self) -> str:
        """The table's name (``nf4``)."""
        return self.label

    @property
    def max_finite(self) -> float:
        """Largest magnitude in the table."""
        return max(abs(v) for v in self.table)

    @property
    def smallest_normal(self) -> float:
        """Smallest non-zero magnitude in the table."""
        return min(abs(v) for v in self.table if v != 0)

    smallest_subnormal = smallest_normal

    @property
    def eps(self) -> float:
        """Not uniform: the largest gap between neighbours, relative to max finite."""
        gaps = [b - a for a, b in zip(self.table, self.table[1:], strict=False)]
        return max(gaps) / self.max_finite

    has_inf = False
    has_nan = False

    def values(self) -> torch.Tensor:
        """float32 value of every code (index = code)."""
        return torch.tensor(self.table, dtype=torch.float32)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes (their low ``bits`` bits) -> float32 table values."""
        return self.values().to(codes.device)[codes.long() & ((1 << self.bits) - 1)]

    def encode(self, values: torch.Tensor) -> torch.Tensor:
        """Nearest table entry (ties to the even code), clamped to the table's ends; uint8 codes."""
        grid = torch.tensor(self.table, dtype=torch.float64, device=values.device)
        return nearest_index(values.float(), grid, "even").to(torch.uint8)


def nearest_index(x: torch.Tensor, grid: torch.Tensor, ties: str) -> torch.Tensor:
    """Index of the value of ascending ``grid`` nearest to each ``x``; ties to the even index or up.

    Midpoints are computed in float64, where every midpoint of a <=16-bit grid is exact, and used in
    float32 when that is exact too (x is float32, so comparisons are then exact either way).
    """
    mids = (grid[:-1] + grid[1:]) / 2
    if torch.equal(mids.float().double(), mids) and torch.equal(grid.float().double(), grid):
        mids = mids.float()  # exact in float32 too (e2m1, nf4 ...): half the memory traffic
    xd = x.to(mids.dtype)
    idx = torch.bucketize(xd, mids, right=False)  # mids[idx-1] < x <= mids[idx]
    on_mid = xd == mids[idx.clamp(max=len(mids) - 1)]
    bump = (idx % 2 == 1) if ties == "even" else torch.ones_like(on_mid)
    return torch.where(on_mid & bump & (idx < len(mids)), idx + 1, idx)
