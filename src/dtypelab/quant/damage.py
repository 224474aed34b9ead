"""What storing values in a format destroys: the one damage accounting of dtypelab.

Quant stage: builds on :mod:`dtypelab.formats` and :mod:`dtypelab.quant.qtensor`. Three callers count
with it, so they can never disagree: ``predict_headroom`` (the float32 run's activations and weights,
rounded with :func:`~dtypelab.quant.qtensor.round_trip`), ``convert``'s cast report (chunk by chunk,
through reused buffers) and ``convert``'s quantized report.

The definitions, for a source value ``x`` and the value ``s`` the format stores for it:

* **overflowed**: ``x`` finite and ``s`` not (inf / NaN), or ``|x|`` beyond
  :func:`overflow_threshold` in a format without inf (e4m3fn saturates: 448 for anything past 464), or
  ``x`` = ±inf stored finite (e4m3fn has no inf: ±448 stands for it, the value is lost);
  for scaled formats, ``x`` beyond its block's reach (:func:`~dtypelab.quant.qtensor.saturated_count`);
* **flushed to zero**: ``x != 0`` and ``s == 0``;
* **subnormal**: ``0 < |s| <`` the format's smallest normal;
* **negligible flush** (a cast tensor's, :attr:`TensorDamage.negligible_flushes`): the tensor's flushes when
  even the largest flushed ``|x|`` lies below :data:`NEGLIGIBLE_FLUSH` (2^-10) times the tensor's RMS;
* **SQNR**: ``10·log10(Σx² / Σ(s − x)²)`` from float64 sums (:func:`sqnr_from_powers`, the formula
  ``compare`` uses too; :func:`sum_of_squares`: squares past float32's range, ``|x|`` > 1.8e19, are summed
  in float64 instead of overflowing to inf).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field, replace

import torch

from ..enums import StrEnum
from ..formats import NumberFormat, rounding_threshold
from .qtensor import QuantizedTensor, ReadBack, Workspace, quantize_read_back, saturated_count

NEGLIGIBLE_FLUSH = 2.0 ** -10
"""A cast tensor's flushes to zero are negligible when its largest flushed ``|x|`` is below this fraction of
the tensor's RMS: each lost value is then under a thousandth of a typical one, so dropping it changes a
dot product with the tensor by under a thousandth of one typical term, the order of fp16's own rounding
of that term (2^-11). The rule is per tensor (all of its flushes are negligible, or none are), so it is
counted in one streaming pass from the largest flushed magnitude and the sum of squares."""


class Action(StrEnum):
    """What a conversion did to one tensor."""

    CAST = "cast"
    COPIED = "copied"
    KEPT = "kept"
    QUANTIZED = "quantized"


def sqnr_from_powers(signal: float, noise: float) -> float:
    """10·log10(signal / noise) in dB from summed squares: inf when noise is 0, -inf when the signal
    is 0 or the noise infinite (an overflowed candidate), NaN when the noise is NaN."""
    if noise == 0:
        return math.inf
    if math.isnan(noise):
        return math.nan
    return 10 * math.log10(signal / noise) if signal and noise != math.inf else -math.inf


@dataclass(frozen=True)
class TensorDamage:
    """What casting one tensor did to its values.

    Args:
        name: the tensor (the first name, when tied tensors share it).
        source_dtype: torch dtype name before (``"float32"``).
        output_dtype: torch dtype name written.
        action: an :class:`Action`: cast, copied (not floating, or already in the target dtype), kept
            (matched a keep pattern) or quantized.
        numel: number of elements.
        overflowed: finite values that became inf or were saturated to the largest finite value.
        flushed_to_zero: non-zero values that became zero.
        subnormal: values that became non-zero subnormals (precision lost, value kept).
        max_rel_error: largest ``|cast - source| / |source|`` over finite non-zero source values that
            did not overflow (a flushed value counts 1.0).
        aliases: other names tied to the same data.
        signal_sq, noise_sq: sums of ``source²`` and ``(stored - source)²`` (quantized tensors only,
            where rounding error is the point: they give :attr:`sqnr_db`).
        max_flushed: the largest ``|source|`` among the values flushed to zero (0.0 when none), in the
            source's units: with :attr:`rms` it decides :attr:`negligible_flushes`.
        source_sq: ``Σ source²`` over the finite source values of a cast tensor (float64 across chunks;
            0 for copied, kept and quantized tensors): gives :attr:`rms`.
    """

    name: str
    source_dtype: str
    output_dtype: str
    action: Action
    numel: int
    overflowed: int = 0
    flushed_to_zero: int = 0
    subnormal: int = 0
    max_rel_error: float = 0.0
    aliases: tuple[str, ...] = ()
    signal_sq: float = 0.0
    noise_sq: float = 0.0
    max_flushed: float = 0.0
    source_sq: float = field(default=0.0, repr=False)

    @property
    def lost_values(self) -> int:
        """Values destroyed outright. A cast loses values that overflow or flush to zero; a quantized
        tensor those clamped beyond its codes' reach (flushing small values onto the zero code is what a
        coarse grid does, and its SQNR reports it). ``--strict`` counts these less the
        :attr:`negligible_flushes`."""
        if self.action == Action.QUANTIZED:
            return self.overflowed
        return self.overflowed + self.flushed_to_zero

    @property
    def rms(self) -> float | None:
        """The tensor's scale, ``sqrt(Σx² / numel)`` over its finite values, in the source's units (cast
        tensors only; None for others, whose values are not read through the caster)."""
        if self.action != Action.CAST:
            return None
        return math.sqrt(self.source_sq / self.numel) if self.numel else 0.0

    @property
    def negligible_flushes(self) -> int:
        """Flushes to zero too small to matter: all of a cast tensor's flushes when its largest flushed
        ``|x|`` is below :data:`NEGLIGIBLE_FLUSH` times its :attr:`rms`, else 0 (and 0 for quantized
        tensors, whose flushes are never lost values)."""
        rms = self.rms
        if not self.flushed_to_zero or rms is None:
            return 0
        return self.flushed_to_zero if self.max_flushed < NEGLIGIBLE_FLUSH * rms else 0

    @property
    def significant_flushes(self) -> int:
        """Flushes to zero that are lost values worth refusing: those not :attr:`negligible_flushes`
        (0 for quantized tensors)."""
        if self.action == Action.QUANTIZED:
            return 0
        return self.flushed_to_zero - self.negligible_flushes

    @property
    def sqnr_db(self) -> float | None:
        """Signal-to-quantization-noise ratio in dB (quantized tensors; inf when exact)."""
        if self.action != Action.QUANTIZED and not self.noise_sq:
            return None
        return sqnr_from_powers(self.signal_sq, self.noise_sq)

    def merged(self, other: TensorDamage) -> TensorDamage:
        """Add the counts of another chunk of the same tensor."""
        return replace(self, overflowed=self.overflowed + other.overflowed,
                       flushed_to_zero=self.flushed_to_zero + other.flushed_to_zero,
                       subnormal=self.subnormal + other.subnormal,
                       max_rel_error=max(self.max_rel_error, other.max_rel_error),
                       signal_sq=self.signal_sq + other.signal_sq, noise_sq=self.noise_sq + other.noise_sq,
                       max_flushed=max(self.max_flushed, other.max_flushed),
                       source_sq=self.source_sq + other.source_sq)

    @classmethod
    def from_counts(cls, counts: DamageCounts, action: Action = Action.CAST) -> TensorDamage:
        """A tensor's damage from :func:`count_damage`'s counts (name fields empty)."""
        return cls("", "", "", action, counts.numel, counts.overflowed, counts.flushed_to_zero,
                   counts.subnormal, counts.max_rel_error, signal_sq=counts.signal_sq,
                   noise_sq=counts.noise_sq)


def overflow_threshold(fmt: NumberFormat) -> float:
    """The largest magnitude a plain format stores without overflowing: half the top binade's step past
    max finite (e4m3fn: 448 + 16), where round to nearest still lands on max."""
    return rounding_threshold(fmt.max_finite, fmt.eps)


@dataclass
class DamageCounts:
    """What rounding one set of values to a format did (see the module docstring for each count);
    :meth:`add` accumulates another set (headroom sums every call of a module).

    ``nonzero`` counts finite non-zero sources, ``non_finite`` sources already inf / NaN (no format can
    help those; they are left out of the other counts, but for an inf that a format without inf stores
    finite, which is an overflow), ``absmax`` the largest finite source magnitude.
    ``max_rel_error`` is the largest ``|s - x| / |x|`` over finite non-zero sources that did not overflow
    (a flushed value counts 1.0); ``signal_sq`` and ``noise_sq`` are ``Σx²`` and ``Σ(s − x)²`` over finite
    sources that did not overflow, in float64 (0 unless asked for: ``count_damage(sums=True)``).
    """

    numel: int = 0
    nonzero: int = 0
    non_finite: int = 0
    absmax: float = 0.0
    overflowed: int = 0
    flushed_to_zero: int = 0
    subnormal: int = 0
    max_rel_error: float = 0.0
    signal_sq: float = field(default=0.0, repr=False)
    noise_sq: float = field(default=0.0, repr=False)

    def add(self, other: DamageCounts) -> None:
        """Add the counts of another set of values to these."""
        for name in ("numel", "nonzero", "non_finite", "overflowed", "flushed_to_zero", "subnormal",
                     "signal_sq", "noise_sq"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.absmax = max(self.absmax, other.absmax)
        self.max_rel_error = max(self.max_rel_error, other.max_rel_error)

    @property
    def sqnr_db(self) -> float:
        """SQNR in dB of what stayed finite (inf when exact)."""
        return sqnr_from_powers(self.signal_sq, self.noise_sq)


def count_damage(source: torch.Tensor, stored: torch.Tensor, fmt: NumberFormat, *,
                 scratch: tuple[torch.Tensor, torch.Tensor] | None = None, sums: bool = True) -> DamageCounts:
    """Count what storing ``source`` in the plain format ``fmt`` did, from its read-back ``stored``.

    Args:
        source: the values, float32 or float64, 1-D (any shape is flattened).
        stored: the same values stored in ``fmt`` and read back in ``source``'s dtype (a cast or
            :func:`~dtypelab.quant.qtensor.round_trip`).
        scratch: a float buffer of ``source``'s dtype and a bool buffer of at least ``source.numel()``
            elements, reused instead of fresh temporaries (fresh memory is what costs on hosts that
            hand freed pages back; ``convert`` passes its chunk buffers).
        sums: also take ``signal_sq`` / ``noise_sq`` (float64 copies; a plain cast's report skips them).
    """
    source, stored = source.reshape(-1), stored.reshape(-1)
    count = source.numel()
    if scratch is None:
        scratch = torch.empty_like(source), torch.empty(count, dtype=torch.bool)
    work, mask = scratch[0][:count], scratch[1][:count]
    torch.abs(source, out=work)
    finite = torch.lt(work, math.inf, out=mask)  # |x| < inf: False for inf and NaN
    non_finite = count - int(finite.sum())
    absmax = float(work.masked_fill_(~finite, 0).max()) if count else 0.0
    nonzero = int(torch.count_nonzero(work))  # finite non-zero: non-finite ones were zeroed just above
    stored_nonzero = int(torch.count_nonzero(stored))
    flushed = int(torch.count_nonzero(source)) - stored_nonzero
    below_normal = int(torch.lt(torch.abs(stored, out=work), fmt.smallest_normal, out=mask).sum())
    subnormal = below_normal - (count - stored_nonzero)
    overflow = _overflowed(source, stored, fmt, work, mask)
    overflowed = int(overflow.sum())
    lost = overflow | ~torch.isfinite(source)
    torch.sub(stored, source, out=work).masked_fill_(lost, 0.0)  # (count,) error of what stayed finite
    signal_sq = noise_sq = 0.0
    if sums and count:
        noise_sq = float(torch.dot(work.double(), work.double()))
        signal = source.masked_fill(lost, 0.0).double()
        signal_sq = float(torch.dot(signal, signal))
    work.abs_().div_(source.abs()).nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)  # 0/0 (exact zero) -> 0
    max_rel = float(work.max()) if count else 0.0
    return DamageCounts(count, nonzero, non_finite, absmax, overflowed, flushed, subnormal, max_rel,
                        signal_sq, noise_sq)


def _overflowed(source: torch.Tensor, stored: torch.Tensor, fmt: NumberFormat, work: torch.Tensor,
                mask: torch.Tensor) -> torch.Tensor:
    """Where a source value overflowed: finite, it was stored as inf / NaN or lies beyond
    :func:`overflow_threshold` (saturated: read back finite); or it was ±inf and stored finite (a format
    without inf saturates it to its largest value: ``--strict`` must see that loss). A new bool tensor;
    ``work`` and ``mask`` are clobbered. For IEEE formats the first two tests agree and the third never
    holds; formats without inf need the last two."""
    torch.gt(torch.abs(source, out=work), overflow_threshold(fmt), out=mask)
    stored_finite = torch.isfinite(stored)
    return (torch.isfinite(source) & (mask | ~stored_finite)) | (torch.isinf(source) & stored_finite)


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"``."""
    return str(dtype).removeprefix("torch.")


@functools.cache
def saturates(dtype: torch.dtype) -> bool:
    """True for formats without inf (fp8 e4m3fn): out-of-range values clamp to the largest finite."""
    return not torch.tensor(float("inf")).to(dtype).float().isinf().item()


def quantization_damage(source: torch.Tensor, qt: QuantizedTensor) -> TensorDamage:
    """What quantizing ``source`` (rows, cols) into ``qt`` did: clamped and flushed values, the
    largest relative error and the squared sums behind the SQNR (name fields empty). For a tensor
    still to quantize, :func:`quantize_counted` counts the same on the way, cheaper."""
    values = source.detach().float().reshape(-1)
    return _quantized_loss(values, qt.dequantize(torch.float32).reshape(-1), saturated_count(source, qt))


def quantize_counted(source: torch.Tensor, fmt: NumberFormat,
                     workspace: Workspace | None = None) -> tuple[QuantizedTensor, TensorDamage]:
    """:func:`~dtypelab.quant.qtensor.quantize_tensor` and :func:`quantization_damage` in one pass: the
    stored values come from the quantizer's own float codes (:func:`quantize_read_back`), so nothing
    is unpacked or divided twice; ``workspace`` (reused buffers) as there."""
    workspace = workspace or Workspace()
    qt, back = quantize_read_back(source, fmt, workspace)
    return qt, read_back_damage(back, workspace)


def read_back_damage(back: ReadBack, workspace: Workspace) -> TensorDamage:
    """:func:`quantize_counted`'s damage from a :func:`quantize_read_back` of ``workspace`` (which it
    uses, and whose ``stored`` values it overwrites): the half of it another thread can do while the
    next chunk is quantized into another workspace."""
    scratch = workspace.take("loss", (back.stored.numel(),), device=back.stored.device)
    return _quantized_loss(back.source.reshape(-1), back.stored.reshape(-1), back.saturated, scratch)


def _quantized_loss(values: torch.Tensor, stored: torch.Tensor, saturated: int,
                    scratch: torch.Tensor | None = None) -> TensorDamage:
    """The counts of :func:`quantization_damage` from the float32 ``values`` and what they read back as
    (``stored``, 1-D, overwritten: it becomes the error, then the relative error; ``scratch``: a float32
    buffer of as many elements, clobbered).

    Every zero is stored exactly (no scale moves it), so an exact zero of the source makes its relative
    error 0 / 0 = NaN: a chunk without NaN there holds no zero, which spares counting the source's
    non-zeros (the usual weight has none). The relative error is ``|stored - x| / |x|``, the cast's rule.
    """
    stored_nonzero = count_nonzero(stored, scratch)
    error = stored.sub_(values)
    signal_sq, noise_sq = sum_of_squares(values), sum_of_squares(error)
    nonzero = values.numel()  # no tensor quantized is empty (quantize_tensor refuses it)
    relative = torch.aminmax(error.div_(values))  # signed: |a / b| is |a| / |b| in IEEE arithmetic
    if math.isnan(float(relative.min)) or math.isnan(float(relative.max)):  # a zero in the source
        nonzero = count_nonzero(values, scratch)
        relative = torch.aminmax(error.nan_to_num_(nan=0.0))
    return TensorDamage("", "", "", Action.QUANTIZED, values.numel(), saturated, nonzero - stored_nonzero,
                        max_rel_error=max(-float(relative.min), float(relative.max)),
                        signal_sq=signal_sq, noise_sq=noise_sq)


def count_nonzero(values: torch.Tensor, scratch: torch.Tensor | None = None) -> int:
    """How many of the float ``values`` (1-D, no NaN) are non-zero: ``sign(x) · sign(x)`` summed by one
    BLAS dot, through ``scratch`` (as many elements, clobbered) when given. torch's ``count_nonzero``
    branches per element: on quantized weights, 14% of them zero at random places, it took 2.2 ms per
    million here against 0.23 ms. Every partial sum is an integer, exact below 2^24 in float32 (2^53 in
    float64); longer tensors and other dtypes take torch's count."""
    exact_below = {torch.float32: 1 << 24, torch.float64: 1 << 53}.get(values.dtype, 0)
    if values.numel() >= exact_below:
        return int(torch.count_nonzero(values))
    signs = torch.sign(values) if scratch is None else torch.sign(values, out=scratch[:values.numel()])
    return int(torch.dot(signs, signs))


SQUARES_FLOOR = 2.0 ** -60
"""A float32 sum of squares below this may hold squares that underflowed (|x| < ~1e-19 squares to
below float32's smallest subnormal): :func:`sum_of_squares` then sums in float64."""


def sum_of_squares(values: torch.Tensor) -> float:
    """``Σx²`` of a float32 (or float64) 1-D tensor, as a Python float (float64).

    One BLAS dot in the tensor's dtype, the fast path for every ordinary tensor; where that result is
    not finite (a square past float32's 3.4e38, ``|x|`` > 1.8e19, or an inf / NaN value) or below
    :data:`SQUARES_FLOOR` (squares that may have underflowed), the sum is taken again in float64, whose
    range holds any float32's square: so an SQNR of weights near 1e20 is finite and right, not inf - inf.
    """
    total = float(torch.dot(values, values))
    if values.dtype != torch.float64 and not SQUARES_FLOOR <= total < math.inf and values.numel():
        wide = values.double()
        total = float(torch.dot(wide, wide))
    return total
