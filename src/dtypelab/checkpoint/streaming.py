"""Cast tensor data chunk by chunk through reused buffers, counting every value the cast destroys.

Fresh allocations cost more than the cast itself on machines that return freed memory to the host, so
one :class:`ChunkCaster` owns all its buffers (a raw read buffer, an output buffer, float scratch) and
reuses them for every chunk of every tensor. Each chunk's damage is counted exactly: values that
overflowed (to inf, or saturated at the largest finite value in formats without inf), values flushed to
zero, values that became subnormal, and the largest relative error among values that stayed finite; and,
so that a flush can be weighed against the tensor's scale once the tensor is done, the largest flushed
magnitude and the sum of squares (one dot product per chunk, on a buffer already there).

Checkpoint stage: the streaming half of the damage accounting; the counts themselves are
:func:`dtypelab.quant.damage.count_damage` (a chunk that is all normal numbers is proved so by the
min/max of its exponent fields and skips the full count).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import replace

import torch

from ..formats import Granularity, NumberFormat
from ..quant import (
    Action,
    QuantizedTensor,
    TensorDamage,
    Workspace,
    count_damage,
    quantize_read_back,
    read_back_damage,
)
from ..quant.damage import saturates, sum_of_squares

CHUNK_ELEMENTS = 1 << 20
"""Elements per chunk: 4 MiB of float32, small enough to stay in cache across the counting passes."""


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
        self._magnitude_bits = (1 << (8 * self.out_dtype.itemsize - 1)) - 1  # all but the sign

    def stream(self, numel: int, source_dtype: torch.dtype, read: Callable[[memoryview, int], None],
               write: Callable[[memoryview], None] | None,
               tick: Callable[[int], None] = lambda nbytes: None) -> TensorDamage:
        """Cast ``numel`` values chunk by chunk: ``read(view, first)`` fills :attr:`raw`'s first bytes
        with the values from element ``first`` on, ``write(bytes)`` takes each chunk's output in order
        (None: count only); ``tick`` hears the source bytes done. The damage is merged in chunk order.

        Reads and writes stay on this thread: an I/O thread beside the cast (two buffer sets) was
        measured and cost more than it hid on these 2 shared cores (docs/benchmarks.md, "Checkpoint
        conversion"), so it was removed.
        """
        itemsize, damage = source_dtype.itemsize, TensorDamage("", "", "", Action.CAST, 0)
        for first in range(0, numel, self.chunk_elements):
            count = min(self.chunk_elements, numel - first)
            read(memoryview(self.raw)[:count * itemsize], first)
            out, chunk = self.cast(source_dtype, count)
            if write is not None:
                write(out)
            damage = damage.merged(chunk)
            tick(count * itemsize)
        return replace(damage, numel=numel)

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
        self._cast_into(source, out, back)
        damage = self._count(source, back, rel, self._mask[:count])
        return memoryview(self.out)[:count * self.out_dtype.itemsize], damage

    def _buffers(self, compute: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if compute not in self._scratch:
            self._scratch[compute] = tuple(torch.empty(self.chunk_elements, dtype=compute)
                                           for _ in range(3))
        return self._scratch[compute]

    def _cast_into(self, source: torch.Tensor, out: torch.Tensor, back: torch.Tensor) -> None:
        """Read the cast back into ``back``; saturating formats are cast here, clamped first."""
        if not self.saturating:
            back.copy_(out)
            return
        largest = self.fmt.max_finite
        torch.clamp(source, -largest, largest, out=back)
        out.copy_(back)
        back.copy_(out)

    def _count(self, source: torch.Tensor, back: torch.Tensor, rel: torch.Tensor,
               mask: torch.Tensor) -> TensorDamage:
        """Exact counts from the source and its round trip ``back`` (cast and read back).

        Most chunks lose nothing outright, which :meth:`_fast_count` proves from the output's bits and
        then only takes the relative error and the sum of squares; other chunks, and every chunk of a
        saturating format (its clamped values read back finite), take the full count.

        The sum of squares (``source_sq``) is :func:`~dtypelab.quant.damage.sum_of_squares`: one BLAS dot
        in the compute dtype (float32; float64 for float64 sources), taken again in float64 where float32
        cannot hold it (``|x| > 1.8e19``: the RMS of such a tensor is finite and right, not inf), then
        float64 across chunks.
        """
        if not self.saturating:
            fast = self._fast_count(source, back, rel)
            if fast is not None:
                return fast
            back.copy_(self._out_view[:source.numel()])  # the fast count worked in place on it
        counts = count_damage(source, back, self.fmt, scratch=(rel, mask), sums=False)
        largest = self._largest_flushed(source, back, rel, mask) if counts.flushed_to_zero else 0.0
        finite = torch.nan_to_num(source, nan=0.0, posinf=0.0, neginf=0.0, out=rel)
        return replace(TensorDamage.from_counts(counts), max_flushed=largest,
                       source_sq=sum_of_squares(finite))

    def _fast_count(self, source: torch.Tensor, back: torch.Tensor, rel: torch.Tensor) -> TensorDamage | None:
        """The counts of a chunk that lost nothing outright (``back`` clobbered), or None when it may have.

        The output's bits prove it (:meth:`_screen`): no inf or NaN, no subnormal, and every zero where
        the source held a zero. The relative error is then the only damage: ``(back - x) / x`` in place
        (a source zero's 0/0 becomes 0, and a flush, which reads -1, sends the chunk to the full count).
        Per 2 GiB of float32 here: the screen ~0.04 s (+0.1 s with zeros), the error and the dot ~0.2 s,
        where the full count takes ~4x as long.
        """
        screen = self._screen(source.numel())
        if screen is None:
            return None
        squares = sum_of_squares(source)  # every value finite: no inf or NaN came out
        error = back.sub_(source).div_(source)  # (count,) signed relative error, NaN at source zeros
        if screen == _ZEROS:
            error.nan_to_num_(nan=0.0)
        low, high = float(torch.amin(error)), float(torch.amax(error))
        if low <= -1.0:  # a value stored as zero that was not one: a flush
            return None
        return TensorDamage("", "", "", Action.CAST, source.numel(), max_rel_error=max(0.0, -low, high),
                            source_sq=squares)

    def _screen(self, count: int) -> str | None:
        """What the output's bits prove about a chunk: :data:`_NORMAL` (every value normal and finite),
        :data:`_ZEROS` (also some zeros, but no subnormal), or None (inf, NaN or subnormal present).

        The exponent fields' min and max decide the first; where some field is 0, the magnitude bits
        less one, wrapped to the top for zeros, have a minimum below the smallest normal's exactly when
        a subnormal is there. Integer passes over the output's 2 bytes a value (for bf16 / fp16).
        """
        bits = self._out_bits[:count]
        exponents = torch.bitwise_and(bits, self._inf_bits, out=self._exponents[:count])
        low, high = torch.aminmax(exponents)
        if int(high) >= self._inf_bits:
            return None
        if int(low) >= self._normal_bits:
            return _NORMAL
        magnitudes = torch.bitwise_and(bits, self._magnitude_bits, out=exponents)
        magnitudes.sub_(1).bitwise_and_(self._magnitude_bits)  # zero -> the largest pattern
        return _ZEROS if int(magnitudes.min()) >= self._normal_bits - 1 else None

    @staticmethod
    def _largest_flushed(source: torch.Tensor, back: torch.Tensor, work: torch.Tensor,
                         mask: torch.Tensor) -> float:
        """The largest ``|x|`` the cast stored as zero (zeros of the source count 0), through the
        scratch buffers ``work`` and ``mask`` (clobbered)."""
        torch.ne(back, 0, out=mask)  # stored non-zero (NaN too): not flushed
        return float(torch.abs(source, out=work).masked_fill_(mask, 0.0).max())

_BITS = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_NORMAL, _ZEROS = "normal", "zeros"


def _bits_of(value: float, dtype: torch.dtype, bits: torch.dtype) -> int:
    """The bit pattern of ``value`` stored in ``dtype``, as a signed integer of the same width."""
    return int(torch.tensor(value, dtype=dtype).view(bits))


class ChunkQuantizer:
    """Quantizes a weight's rows a chunk at a time, through read buffers that grow to fit, and counts
    each chunk's damage on a second thread while the next chunk is read and quantized.

    Scales are per row or per group of a row, so chunks of whole rows give exactly the codes of the
    whole tensor; a per-tensor scale needs every row at once (one chunk).

    Why the second thread: counting what a chunk lost (its stored values' error, two dot products, the
    relative error's extremes, the non-zeros: ~seven float32 passes) takes ~60% of quantizing's time,
    and the conversion otherwise runs on one core (:func:`one_thread`). So there are two sets of
    buffers (read bytes, the quantizer's workspace): while chunk i is quantized in one set, the second
    thread counts chunk i - 1 and then reads chunk i + 1 (:meth:`read_ahead`) into the other
    (:meth:`next_chunk` waits for both). A chunk's damage comes back as a future (already done where it
    was counted inline).

    Args:
        fmt: the quantized format.
        chunk_elements: about how many elements a chunk holds (at least 32 rows).
    """

    ROWS_MULTIPLE = 32  # packed zero points hold 32 / bits rows per int32 word: chunks never split one

    def __init__(self, fmt: NumberFormat, chunk_elements: int = CHUNK_ELEMENTS):
        self.fmt, self.chunk_elements = fmt, chunk_elements
        self._sets = (_ChunkBuffers(), _ChunkBuffers())
        self._turn, self._counter = 0, None

    @property
    def raw(self) -> bytearray:
        """The current chunk's read buffer."""
        return self._sets[self._turn].raw

    @property
    def workspace(self) -> Workspace:
        """The current chunk's quantizer temporaries, reused from chunk to chunk (every other chunk)."""
        return self._sets[self._turn].workspace

    @contextmanager
    def counting(self, chunks: int) -> Iterator[None]:
        """One tensor of ``chunks`` chunks: each counted on a second thread while the next is read and
        quantized, where that can gain: more than one chunk, and quantizing on one torch thread (as
        convert's :func:`one_thread` sets; with more, two threads' teams would share the cores); else
        inline. The tensor starts in the first set of buffers, so a one-chunk tensor (a ``:tensor`` or
        NVFP4 weight, any small one) never grows the second. Every count has finished when the block
        ends: no thread outlives a tensor (nor a conversion, nor reaches a fork)."""
        for buffers in self._sets:  # a tensor that ended early (an error) may leave a read ahead done
            _wait(buffers)
            buffers.reading = None
        self._turn = 0
        if chunks < 2 or torch.get_num_threads() != 1:
            yield
            return
        with ThreadPoolExecutor(1, thread_name_prefix="dtypelab-count", initializer=torch.set_num_threads,
                                initargs=(1,)) as counter:  # the thread's first BLAS call: one thread too
            self._counter = counter
            try:
                yield
            finally:
                self._counter = None

    def next_chunk(self) -> None:
        """Move to the other set of buffers, once the count still reading it (two chunks ago) is done
        and the chunk :meth:`read_ahead` reads into it has arrived (its error raised here)."""
        self._turn = 1 - self._turn
        buffers = self._sets[self._turn]
        _wait(buffers)
        reading, buffers.reading = buffers.reading, None
        if reading is not None:
            reading.result()

    def read_ahead(self, nbytes: int, fill: Callable[[memoryview], None]) -> None:
        """Have the next chunk's ``nbytes`` filled (``fill(view)``) into the other set of buffers: on the
        second thread, queued behind the count still reading that set (its one worker runs them in
        order), while this chunk is quantized; at once where there is no second thread (so a read
        error comes one chunk earlier there). The next :meth:`next_chunk` waits for it (and raises its
        error); :meth:`buffer` then returns what it read."""
        target = self._sets[1 - self._turn]
        if self._counter is None:
            _wait(target)
            fill(_grown(target, nbytes))
            return
        target.reading = self._counter.submit(lambda: fill(_grown(target, nbytes)))

    def row_chunks(self, rows: int, cols: int, fmt: NumberFormat | None = None) -> list[tuple[int, int]]:
        """``(first row, row count)`` per chunk: one chunk for a format with a per-tensor scale (a
        ``:tensor`` granularity, or NVFP4's global scale, which depends on the whole tensor's absmax).
        ``fmt``: this tensor's own format (a mixed-precision plan), else the quantizer's."""
        fmt = fmt or self.fmt
        if fmt.granularity == Granularity.TENSOR or fmt.tensor_scale:
            return [(0, rows)]
        step = max(self.ROWS_MULTIPLE, self.chunk_elements // max(cols, 1) // self.ROWS_MULTIPLE
                   * self.ROWS_MULTIPLE)
        return [(first, min(step, rows - first)) for first in range(0, rows, step)]

    def buffer(self, nbytes: int) -> memoryview:
        """The current read buffer's first ``nbytes`` (grown, never shrunk, so it is reused)."""
        return _grown(self._sets[self._turn], nbytes)

    def quantize(self, source_dtype: torch.dtype, rows: int, cols: int,
                 fmt: NumberFormat | None = None) -> tuple[QuantizedTensor, Future]:
        """Quantize the ``rows`` x ``cols`` values held at the start of the current buffer."""
        source = torch.frombuffer(self.raw, dtype=source_dtype, count=rows * cols).reshape(rows, cols)
        return self.quantize_rows(source, fmt)

    def quantize_rows(self, source: torch.Tensor,
                      fmt: NumberFormat | None = None) -> tuple[QuantizedTensor, Future]:
        """Quantize the (rows, cols) tensor ``source`` (in ``fmt``, default the quantizer's) and count
        what it lost: a future of that :class:`TensorDamage`, counted on the second thread inside a
        :meth:`counting` that has one (``source`` must then stay unchanged until it is done, as the read
        buffers do until :meth:`next_chunk` comes back to them), else already done."""
        buffers = self._sets[self._turn]
        _wait(buffers)  # two chunks into one set without next_chunk: its count must finish first
        qt, back = quantize_read_back(source, fmt or self.fmt, buffers.workspace)
        if self._counter is None:
            counted: Future = Future()
            counted.set_result(read_back_damage(back, buffers.workspace))
            return qt, counted
        buffers.pending = self._counter.submit(read_back_damage, back, buffers.workspace)
        return qt, buffers.pending

    def transposed(self, source_dtype: torch.dtype, rows: int, cols: int) -> torch.Tensor:
        """The (cols, rows) transpose of the (rows, cols) tensor at the start of the buffer, as a
        contiguous copy (a Conv1D weight, stored (in, out), quantized as the Linear it is)."""
        stored = torch.frombuffer(self.raw, dtype=source_dtype, count=rows * cols).reshape(rows, cols)
        return stored.t().contiguous()


class _ChunkBuffers:
    """One chunk's buffers: the bytes read, the quantizer's workspace, and the count still using them."""

    def __init__(self):
        self.raw, self.workspace = bytearray(), Workspace()
        self.pending: Future | None = None  # the count reading these buffers
        self.reading: Future | None = None  # the read ahead filling ``raw``


def _grown(buffers: _ChunkBuffers, nbytes: int) -> memoryview:
    """``buffers``' read buffer's first ``nbytes``, grown to fit (never shrunk, so it is reused)."""
    if len(buffers.raw) < nbytes:
        buffers.raw = bytearray(nbytes)
    return memoryview(buffers.raw)[:nbytes]


def _wait(buffers: _ChunkBuffers) -> None:
    """Until the count still reading ``buffers`` is done (its result, or error, stays with its future)."""
    if buffers.pending is not None:
        buffers.pending.exception()
        buffers.pending = None
