"""Cast tensor data chunk by chunk through reused buffers, counting every value the cast destroys.

Fresh allocations cost more than the cast itself on machines that return freed memory to the host, so
one :class:`ChunkCaster` owns all its buffers (a raw read buffer, an output buffer, float scratch) and
reuses them for every chunk of every tensor. Each chunk's damage is counted exactly: values that
overflowed (to inf, or saturated at the largest finite value in formats without inf), values flushed to
zero, values that became subnormal, and the largest relative error among values that stayed finite.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace

import torch

from .codecs import rounding_threshold
from .formats import NumberFormat
from .qtensor import QuantizedTensor, quantize_tensor, saturated_count

CHUNK_ELEMENTS = 1 << 20
"""Elements per chunk: 4 MiB of float32, small enough to stay in cache across the counting passes."""


@dataclass(frozen=True)
class TensorDamage:
    """What casting one tensor did to its values.

    Args:
        name: the tensor (the first name, when tied tensors share it).
        source_dtype: torch dtype name before (``"float32"``).
        output_dtype: torch dtype name written.
        action: ``"cast"``, ``"copied"`` (not floating, or already in the target dtype) or ``"kept"``
            (matched a keep pattern).
        numel: number of elements.
        overflowed: finite values that became inf or were saturated to the largest finite value.
        flushed_to_zero: non-zero values that became zero.
        subnormal: values that became non-zero subnormals (precision lost, value kept).
        max_rel_error: largest ``|cast - source| / |source|`` over finite non-zero source values that
            did not overflow (a flushed value counts 1.0).
        aliases: other names tied to the same data.
        signal_sq, noise_sq: sums of ``source²`` and ``(stored - source)²`` (quantized tensors only,
            where rounding error is the point: they give :attr:`sqnr_db`).
    """

    name: str
    source_dtype: str
    output_dtype: str
    action: str
    numel: int
    overflowed: int = 0
    flushed_to_zero: int = 0
    subnormal: int = 0
    max_rel_error: float = 0.0
    aliases: tuple[str, ...] = ()
    signal_sq: float = 0.0
    noise_sq: float = 0.0

    @property
    def lost_values(self) -> int:
        """Values destroyed outright; what ``--strict`` refuses. A cast loses values that overflow or
        flush to zero; a quantized tensor those clamped beyond its codes' reach (flushing small values
        onto the zero code is what a coarse grid does, and its SQNR reports it)."""
        if self.action == "quantized":
            return self.overflowed
        return self.overflowed + self.flushed_to_zero

    @property
    def sqnr_db(self) -> float | None:
        """Signal-to-quantization-noise ratio in dB (quantized tensors; inf when exact)."""
        if self.action != "quantized" and not self.noise_sq:
            return None
        if not self.noise_sq:
            return math.inf
        return 10 * math.log10(self.signal_sq / self.noise_sq) if self.signal_sq else -math.inf

    def merged(self, other: TensorDamage) -> TensorDamage:
        """Add the counts of another chunk of the same tensor."""
        return replace(self, overflowed=self.overflowed + other.overflowed,
                       flushed_to_zero=self.flushed_to_zero + other.flushed_to_zero,
                       subnormal=self.subnormal + other.subnormal,
                       max_rel_error=max(self.max_rel_error, other.max_rel_error),
                       signal_sq=self.signal_sq + other.signal_sq, noise_sq=self.noise_sq + other.noise_sq)


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"``."""
    return str(dtype).removeprefix("torch.")


def saturates(dtype: torch.dtype) -> bool:
    """True for formats without inf (fp8 e4m3fn): out-of-range values clamp to the largest finite."""
    return not torch.tensor(float("inf")).to(dtype).float().isinf().item()


_BITS = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _bits_of(value: float, dtype: torch.dtype, bits: torch.dtype) -> int:
    """The bit pattern of ``value`` stored in ``dtype``, as a signed integer of the same width."""
    return int(torch.tensor(value, dtype=dtype).view(bits))


@contextmanager
def one_thread() -> Iterator[None]:
    """Run torch single-threaded for a while: on small chunks, thread hand-offs cost more than they win.

    Measured here on 2 shared cores with another process busy: 0.22 s per 512 MiB with one thread,
    8 s with two (every op waits for a descheduled worker).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class ChunkCaster:
    """Casts raw little-endian chunks of floating tensors to one format, reusing every buffer.

    Args:
        fmt: the target format (must have a floating torch dtype).
        chunk_elements: elements per chunk; buffers are sized for it.
    """

    def __init__(self, fmt: NumberFormat, chunk_elements: int = CHUNK_ELEMENTS):
        self.fmt, self.chunk_elements = fmt, chunk_elements
        self.out_dtype = fmt.torch_dtype
        self.saturating = saturates(self.out_dtype)
        self.raw = bytearray(chunk_elements * 8)  # room for float64 sources
        self.out = bytearray(chunk_elements * self.out_dtype.itemsize)
        self._out_view = torch.frombuffer(self.out, dtype=self.out_dtype)
        self._mask = torch.empty(chunk_elements, dtype=torch.bool)
        self._scratch: dict[torch.dtype, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        bits = _BITS[self.out_dtype.itemsize]
        self._out_bits = torch.frombuffer(self.out, dtype=bits)
        self._exponents = torch.empty(chunk_elements, dtype=bits)
        # the exponent field's mask is inf's bit pattern; a normal number's field is at least that of
        # the smallest normal (formats without inf are screened by clamping instead)
        self._inf_bits = 0 if self.saturating else _bits_of(float("inf"), self.out_dtype, bits)
        self._normal_bits = _bits_of(fmt.smallest_normal, self.out_dtype, bits)
        # values up to this round onto max anyway (a tie rounds down: e4m3fn's max 1.110b x 2^8 is even);
        # only values beyond are saturated
        self._saturation_limit = rounding_threshold(fmt.max_finite, fmt.eps)

    def cast(self, source_dtype: torch.dtype, count: int) -> tuple[memoryview, TensorDamage]:
        """Cast the first ``count`` elements held in ``self.raw`` (as ``source_dtype``).

        Returns:
            The output bytes (a view into the reused output buffer, valid until the next call) and
            the chunk's damage counts (name fields empty).
        """
        source = torch.frombuffer(self.raw, dtype=source_dtype, count=count)
        compute = torch.float64 if source_dtype == torch.float64 else torch.float32
        upcast, back, rel = (t[:count] for t in self._buffers(compute))
        out = self._out_view[:count]
        if not self.saturating:
            out.copy_(source)  # straight from the source dtype: exactly torch's own cast, NaNs included
        if source_dtype != compute:
            upcast.copy_(source)  # exact: fp16/bf16 -> fp32 loses nothing
            source = upcast
        overflowed = self._cast_into(source, out, back)
        damage = self._count(source, back, rel, self._mask[:count], overflowed)
        return memoryview(self.out)[:count * self.out_dtype.itemsize], damage

    def _buffers(self, compute: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if compute not in self._scratch:
            self._scratch[compute] = tuple(torch.empty(self.chunk_elements, dtype=compute)
                                           for _ in range(3))
        return self._scratch[compute]

    def _cast_into(self, source: torch.Tensor, out: torch.Tensor, back: torch.Tensor) -> int | None:
        """Read the cast back; saturating formats are cast here, clamped first: return how many were."""
        if not self.saturating:
            back.copy_(out)
            return None
        largest = self.fmt.max_finite
        torch.abs(source, out=back)
        clamped = int(torch.gt(back, self._saturation_limit, out=self._mask[:source.numel()]).sum())
        clamped -= int(torch.isinf(back).sum())  # an inf source is not a finite value lost
        torch.clamp(source, -largest, largest, out=back)
        out.copy_(back)
        back.copy_(out)
        return clamped

    def _count(self, source: torch.Tensor, back: torch.Tensor, rel: torch.Tensor, mask: torch.Tensor,
               clamped: int | None) -> TensorDamage:
        """Exact counts from the source and its round trip ``back`` (cast and read back).

        Most chunks hold neither zeros, subnormals, infs nor NaNs: the min/max of the output's
        exponent fields proves it (all normal, none all-ones), leaving only the relative error to
        compute; other chunks take the full count.
        """
        count = source.numel()
        if clamped is not None or not self._all_normal(count):
            return self._count_all(source, back, rel, mask, clamped)
        torch.sub(back, source, out=rel).div_(source)  # (count,) signed relative error; |source| > 0
        low, high = torch.aminmax(rel)
        return TensorDamage("", "", "", "cast", count, max_rel_error=max(-float(low), float(high)))

    def _all_normal(self, count: int) -> bool:
        exponents = torch.bitwise_and(self._out_bits[:count], self._inf_bits, out=self._exponents[:count])
        low, high = torch.aminmax(exponents)
        return int(low) >= self._normal_bits and int(high) < self._inf_bits

    def _count_all(self, source: torch.Tensor, back: torch.Tensor, rel: torch.Tensor, mask: torch.Tensor,
                   clamped: int | None) -> TensorDamage:
        count = source.numel()
        nonzero_back = int(torch.count_nonzero(back))
        flushed = int(torch.count_nonzero(source)) - nonzero_back
        torch.abs(back, out=rel)
        below_normal = int(torch.lt(rel, self.fmt.smallest_normal, out=mask).sum())
        subnormal = below_normal - (count - nonzero_back)
        torch.sub(back, source, out=rel).div_(source).abs_()  # (count,) relative error; 0/0 -> nan
        overflowed = int(torch.eq(rel, float("inf"), out=mask).sum()) if clamped is None else clamped
        rel.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)  # overflow counted above, not an error size
        if clamped:  # saturated values are counted as overflowed, not as an error size either
            torch.gt(torch.abs(source, out=back), self._saturation_limit, out=mask)
            rel.masked_fill_(mask, 0.0)
        max_rel = float(rel.max()) if count else 0.0
        return TensorDamage("", "", "", "cast", count, overflowed, flushed, subnormal, max_rel)


def quantization_damage(source: torch.Tensor, qt: QuantizedTensor) -> TensorDamage:
    """What quantizing ``source`` (rows, cols) into ``qt`` did: clamped and flushed values, the
    largest relative error and the squared sums behind the SQNR (name fields empty).

    Works in place on one dequantized copy (fresh temporaries cost more than the arithmetic here);
    the squared sums accumulate in float32 per chunk (BLAS dot), then in float64 across chunks.
    """
    values = source.float().reshape(-1)
    error = qt.dequantize(torch.float32).reshape(-1)  # the stored values
    # zero always quantizes to exactly zero, so every zero of the output not in the input was flushed
    flushed = int(torch.count_nonzero(values)) - int(torch.count_nonzero(error))
    error.sub_(values)
    signal_sq, noise_sq = float(torch.dot(values, values)), float(torch.dot(error, error))
    tiny = torch.finfo(torch.float32).tiny  # a zero input has a zero error: 0 / tiny = 0
    rel = error.abs_().div_(values.abs().clamp_(min=tiny))
    return TensorDamage("", "", "", "quantized", values.numel(), saturated_count(source, qt), flushed,
                        max_rel_error=float(rel.max()) if values.numel() else 0.0,
                        signal_sq=signal_sq, noise_sq=noise_sq)


class ChunkQuantizer:
    """Quantizes a weight's rows a chunk at a time, through one read buffer that grows to fit.

    Scales are per row or per group of a row, so chunks of whole rows give exactly the codes of the
    whole tensor; a per-tensor scale needs every row at once (one chunk).

    Args:
        fmt: the quantized format.
        chunk_elements: about how many elements a chunk holds (at least 32 rows).
    """

    ROWS_MULTIPLE = 32  # packed zero points hold 32 / bits rows per int32 word: chunks never split one

    def __init__(self, fmt: NumberFormat, chunk_elements: int = CHUNK_ELEMENTS):
        self.fmt, self.chunk_elements, self.raw = fmt, chunk_elements, bytearray()

    def row_chunks(self, rows: int, cols: int) -> list[tuple[int, int]]:
        """``(first row, row count)`` per chunk."""
        if self.fmt.granularity == "tensor":
            return [(0, rows)]
        step = max(self.ROWS_MULTIPLE, self.chunk_elements // max(cols, 1) // self.ROWS_MULTIPLE
                   * self.ROWS_MULTIPLE)
        return [(first, min(step, rows - first)) for first in range(0, rows, step)]

    def buffer(self, nbytes: int) -> memoryview:
        """The read buffer's first ``nbytes`` (grown, never shrunk, so it is reused)."""
        if len(self.raw) < nbytes:
            self.raw = bytearray(nbytes)
        return memoryview(self.raw)[:nbytes]

    def quantize(self, source_dtype: torch.dtype, rows: int,
                 cols: int) -> tuple[QuantizedTensor, TensorDamage]:
        """Quantize the ``rows`` x ``cols`` values held at the start of the buffer."""
        source = torch.frombuffer(self.raw, dtype=source_dtype, count=rows * cols).reshape(rows, cols)
        qt = quantize_tensor(source, self.fmt)
        return qt, quantization_damage(source, qt)
