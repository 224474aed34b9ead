"""Quantize one 2-D tensor to a scaled format: codes + scales in their own dtypes, and back.

Layout: a (rows, cols) tensor is cut into blocks along cols — one block per row (``channel``),
``cols / g`` blocks per row (``gN``) or one block for everything (``tensor``). Each block gets a scale
(and a zero point when asymmetric); elements are ``codec.encode(x / scale)``, clamped to the codec's
range first (saturation), so the stored value is always finite. 4-bit codes are packed two per byte,
2- and 3-bit codes densely into int32 words (the compressed-tensors order).
Scale rules: absmax / max_finite rounded to the scale format (RNE). Symmetric integers use all 2^b
codes: the block's largest-magnitude value x_ext maps onto the most negative code (scale = x_ext / -8
for int4, as llama.cpp's Q4_0 does), so the scale is signed and the extreme's side gets the extra code
(int4: 16 levels instead of 15, +1.2 dB at the same bits). e8m0 (OCP MX) takes
2^(floor(log2 absmax) - emax of the element), as the OCP MX spec says, saturating elements above max.

NVFP4 is the compressed-tensors package's rule (its NVFP4A16 scheme, the checkpoints vLLM serves), bit
for bit: an fp32 *global scale* ``g = 448 * 6 / absmax(tensor)`` (1 when that is not finite: an all-zero
or near-zero tensor), a divisor; each block of 16 takes ``s = e4m3(g * (absmax(block) / 6))`` (0.125
where that is 0, the package's guard against dividing by zero), elements are ``e2m1(x / fp32(s / g))``
and the value is ``code * fp32(s / g)``, all in float32. The package's decompression computes exactly
that product (then rounds it to the model's dtype, as :meth:`QuantizedTensor.dequantize` does).

:func:`round_trip` is the one rounding every analysis uses (a plain format's torch cast, a scaled
format's quantize-and-back), so a prediction rounds exactly as the stored model does.
Quant stage: builds on :mod:`dtypelab.formats`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import InputError
from ..formats import E4M3, E5M2, SCALE_DTYPES, Granularity, IntCodec, NumberFormat, rounding_threshold
from . import mse_kernel
from .packing import pack_bits, pack_nibbles, unpack_bits, unpack_nibbles

NATIVE_FLOAT8 = {E4M3: torch.float8_e4m3fn, E5M2: torch.float8_e5m2}
CHUNK_ELEMENTS = 1 << 20  # rows quantized together: ~4 MB of float32 per temporary
MSE_CLIP_RATIOS = tuple(1.0 - 0.025 * i for i in range(21))  # 1.0 .. 0.5: clip candidates for :mse
MSE_CHUNK_ELEMENTS = 1 << 18  # candidates x elements per stacked :mse temporary and intra-op thread: 1 MiB
ARGMIN_BLOCKS = 4096  # blocks up to which the first smallest error is an argmin (see _first_smallest)
NVFP4_ZERO_SCALE = 0.125  # the package's stored block scale where e4m3(g * absmax / 6) is 0 (e4m3's "eps")


@dataclass
class QuantizedTensor:
    """A tensor stored as codes and scales; ``dequantize`` gives it back in any float dtype.

    Args:
        fmt: the format (with its granularity).
        shape: (rows, cols) of the original tensor.
        data: codes, (rows, cols) for 8-bit formats (int8 / float8 / uint8 dtype) or
            (rows, ceil(cols / 2)) uint8 with two 4-bit codes per byte.
        scale: (rows or 1, blocks per row, 1) in the format's scale dtype.
        zero_point: uint8, shaped like ``scale``, for asymmetric formats; else None.
        tensor_scale: NVFP4's fp32 global scale ``g``, shape (1,): a *divisor* (block scale / g is the
            step), exactly the package's ``weight_global_scale``; None for other formats.
    """

    fmt: NumberFormat
    shape: tuple[int, int]
    data: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor | None = None
    tensor_scale: torch.Tensor | None = None

    @property
    def nbytes(self) -> int:
        """True storage bytes: codes + scales + zero points + tensor scale."""
        parts = (self.data, self.scale, self.zero_point, self.tensor_scale)
        return sum(t.numel() * t.element_size() for t in parts if t is not None)

    def codes(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Element codes (rows, cols) as stored, unpacked; ``rows`` selects a subset of rows."""
        data = self.data if rows is None else self.data[rows]
        if self.fmt.bits == 4:
            return unpack_nibbles(data, self.shape[1])
        if self.fmt.bits < 8:  # 2, 3 bits: int32 words, packed densely
            return unpack_bits(data, self.fmt.bits, self.shape[1])
        return data.view(torch.uint8) if data.dtype.is_floating_point else data

    def dequantize(self, dtype: torch.dtype = torch.float32,
                   rows: torch.Tensor | None = None) -> torch.Tensor:
        """Values (rows, cols) in ``dtype``: decode(codes) (minus zero point) times the block scale
        (NVFP4: times fp32(scale / g)), computed in float32 and rounded once to ``dtype``."""
        values = _decode_elements(self, rows)  # (rows, cols) float32
        scale = _decoded_scale(_select_rows(self.scale, rows), self.tensor_scale)
        zp = _select_rows(self.zero_point, rows)
        blocks = values.reshape(values.shape[0], scale.shape[1], -1)  # (rows, blocks, block)
        if zp is not None:
            blocks = blocks - zp.float()
        return (blocks * scale).reshape(values.shape).to(dtype)


def quantize_tensor(tensor: torch.Tensor, fmt: NumberFormat) -> QuantizedTensor:
    """Quantize ``tensor`` (2-D, or any shape read as rows of its last dimension) to ``fmt``.

    Raises:
        InputError: NaN/inf values, a group size that does not divide the row length.
    Example:
        >>> qt = quantize_tensor(torch.randn(4, 256), get_format("int4:g128"))
        >>> qt.nbytes * 8 / (4 * 256)
        4.125
    """
    return _quantize(tensor, fmt, Workspace(), read_back=False)[0]


def quantize_read_back(tensor: torch.Tensor, fmt: NumberFormat,
                       workspace: Workspace | None = None) -> tuple[QuantizedTensor, ReadBack]:
    """:func:`quantize_tensor`, plus what the stored tensor reads back, computed on the way: the codes
    still in float32 become the stored values with one multiply, so counting what quantizing lost needs
    no second pass over packed codes (``convert`` counts every weight it quantizes).

    ``workspace``: buffers reused from call to call (``convert`` keeps one for the whole checkpoint);
    the :class:`ReadBack` tensors live in it, valid until its next use (``source`` is the input itself
    when that is float32 already). A buffer keeps its largest size: a per-tensor or NVFP4 weight, one
    chunk, leaves ~16 bytes per element of it held until the workspace goes.
    """
    return _quantize(tensor, fmt, workspace or Workspace(), read_back=True)


@dataclass
class ReadBack:
    """What a quantized tensor stores, beside the values it came from (both float32, (rows, cols)).

    Args:
        source: the values quantized, as float32 rows (never written).
        stored: what :meth:`QuantizedTensor.dequantize` returns, value for value (``==``; an integer
            code's zero may carry the other sign: ``round`` keeps ``-0.0``, decoding gives ``+0.0``).
        saturated: the values clipped, :func:`saturated_count`'s number.
    """

    source: torch.Tensor
    stored: torch.Tensor
    saturated: int


class Workspace:
    """Named buffers that a quantization's row chunks reuse instead of allocating.

    Why: on hosts that hand freed pages back, touching fresh memory costs ~2.4 s/GiB, more than the
    arithmetic; quantizing a 1M-element int4:g128 chunk took 9.6 ms with fresh temporaries and takes
    3.3 ms through reused ones (``docs/benchmarks.md``, "Quantized conversion"). A buffer grows to the
    largest request and is never shrunk.
    """

    def __init__(self):
        self._buffers: dict[str, torch.Tensor] = {}

    def take(self, name: str, shape: tuple[int, ...], dtype: torch.dtype = torch.float32,
             device: torch.device | str = "cpu") -> torch.Tensor:
        """A contiguous ``shape`` tensor from buffer ``name`` (its old contents are garbage)."""
        numel, device = math.prod(shape), torch.device(device)
        buffer = self._buffers.get(name)
        if buffer is None or buffer.numel() < numel or buffer.dtype != dtype or buffer.device != device:
            buffer = self._buffers[name] = torch.empty(numel, dtype=dtype, device=device)
        return buffer[:numel].view(shape)


def _quantize(tensor: torch.Tensor, fmt: NumberFormat, work: Workspace,
              read_back: bool) -> tuple[QuantizedTensor, ReadBack | None]:
    """Row chunk by row chunk through ``work``; with ``read_back``, the stored values and the clipped
    count too (the stored values fill one whole-tensor buffer, a chunk's rows at a time)."""
    rows = _as_rows(tensor, work)
    _check_quantizable(rows, fmt)
    tensor_scale = _tensor_scale(rows, fmt)
    stored = work.take("stored", tuple(rows.shape), device=rows.device) if read_back else None
    parts, start = [], 0
    for chunk in _row_chunks(rows, fmt):
        into = None if stored is None else stored[start:start + chunk.shape[0]]
        parts.append(_quantize_rows(chunk, fmt, tensor_scale, work, into))
        start += chunk.shape[0]
    data, scale, zp = (_joined(part) for part in zip(*(p[:3] for p in parts), strict=True))
    qt = QuantizedTensor(fmt, tuple(rows.shape), data, scale, zp, tensor_scale)
    return qt, None if stored is None else ReadBack(rows, stored, sum(p[3] for p in parts))


def round_trip(tensor: torch.Tensor, fmt: NumberFormat) -> torch.Tensor:
    """``tensor`` stored in ``fmt`` and read back in its own dtype (round to nearest even).

    Plain formats are a torch cast (saturating codecs such as e4m3 clamp first, as the stored cast
    does); scaled formats quantize the last dimension as rows (a 1-D tensor is one row, a scalar a row
    of one) with this format's scales, exactly as :func:`quantize_tensor` stores them; an empty tensor
    comes back as it is. A row length the group size does not divide is zero-padded to the next
    multiple (zeros change no absmax and are stored exactly), so any activation can be rounded;
    storing a weight that way is refused instead (see :func:`quantize_tensor`).
    """
    if not fmt.is_quantized:
        saturating = fmt.codec is not None and fmt.codec.overflow == "saturate"
        clamped = tensor.clamp(-fmt.max_finite, fmt.max_finite) if saturating else tensor
        return clamped.to(fmt.torch_dtype).to(tensor.dtype)
    if tensor.numel() == 0:  # nothing to round (and no block to take a scale from)
        return tensor.clone()
    if tensor.dim() == 0:  # a scalar is a row of one
        return round_trip(tensor.reshape(1), fmt).reshape(())
    cols = tensor.shape[-1]
    pad = -cols % fmt.group_size if fmt.granularity == Granularity.GROUP else 0
    padded = torch.nn.functional.pad(tensor, (0, pad)) if pad else tensor
    back = quantize_tensor(padded, fmt).dequantize(tensor.dtype).reshape(padded.shape)
    return back[..., :cols] if pad else back


def _row_chunks(rows: torch.Tensor, fmt: NumberFormat) -> tuple[torch.Tensor, ...]:
    """Rows in chunks of about ``CHUNK_ELEMENTS``: the scale search's temporaries stay cache-sized and
    are reused instead of touching fresh memory. A per-tensor scale needs all rows at once."""
    if fmt.granularity == Granularity.TENSOR:
        return (rows,)
    return rows.split(max(1, CHUNK_ELEMENTS // rows.shape[1]))


def _joined(pieces: tuple[torch.Tensor | None, ...]) -> torch.Tensor | None:
    """The chunks' pieces of one part along rows; one chunk's piece as it is (``torch.cat`` would copy it)."""
    if pieces[0] is None:
        return None
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces)


def _quantize_rows(rows: torch.Tensor, fmt: NumberFormat, tensor_scale: torch.Tensor | None, work: Workspace,
                   stored: torch.Tensor | None = None) -> tuple:
    """(stored codes, scale, zero point, clipped count) of some whole rows; ``stored`` given, the values
    the codes read back are written into it (float32, the rows' shape) and the clipped are counted
    (else the count is 0)."""
    blocks = _blocks(rows, fmt)
    stats = _block_stats(blocks, fmt, work)
    _check_finite(stats)
    scale, zp = _scales_from_stats(blocks, stats, fmt, tensor_scale)
    decoded = _decoded_scale(scale, tensor_scale)
    scaled = work.take("scaled", tuple(blocks.shape), device=rows.device) if stored is None \
        else stored.view(blocks.shape)
    _scaled(blocks, decoded, zp, out=scaled)
    saturated = 0 if stored is None else _count_saturated(scaled, stats, decoded, zp, fmt)
    codes = _encode_scaled(scaled, fmt, values=False) if stored is None \
        else _encode_reading_back(scaled, fmt, decoded, zp)
    return _store_codes(codes.reshape(rows.shape), fmt), scale, zp, saturated


def _encode_reading_back(scaled: torch.Tensor, fmt: NumberFormat, decoded: torch.Tensor,
                         zp: torch.Tensor | None) -> torch.Tensor:
    """The codes of ``scaled`` (:func:`_encode_scaled`), which becomes the values they store:
    ``(code - zero point) * step``, dequantize's operations (``decoded``: the float32 steps)."""
    codes = _encode_scaled(scaled, fmt, values=True)
    if zp is not None:
        scaled.sub_(zp.float())
    scaled.mul_(decoded)
    return codes


def _encode_scaled(scaled: torch.Tensor, fmt: NumberFormat, values: bool) -> torch.Tensor:
    """Element codes of the scaled values (:func:`_encode_blocks`' codes; integers in one byte), clobbering
    ``scaled``; with ``values``, ``scaled`` ends holding each code's decoded value, so the stored values
    are one multiply away (integer codes hold it anyway: they are rounded and clamped in place)."""
    codec = fmt.element_codec
    if isinstance(codec, IntCodec):  # codec.encode's round and clamp, in place; one byte holds any code
        return scaled.round_().clamp_(codec.min_value, codec.max_finite).to(
            torch.int8 if codec.signed else torch.uint8)
    scaled.clamp_(-codec.max_finite, codec.max_finite)
    if codec in NATIVE_FLOAT8:  # the codes of codec.encode, bit for bit (tests/test_formats.py), faster
        codes = scaled.to(NATIVE_FLOAT8[codec])
        if values:
            scaled.copy_(codes)  # float8 -> float32 is exact
        return codes.view(torch.uint8)
    codes = codec.encode(scaled)
    if values:
        scaled.copy_(codec.decode(codes).reshape(scaled.shape))
    return codes


def _as_rows(tensor: torch.Tensor, work: Workspace | None = None) -> torch.Tensor:
    """float32 (rows, cols) view: a 1-D tensor is one row, N-D tensors are rows of the last dim. Another
    dtype is converted into ``work``'s ``source`` buffer when given (else a new tensor)."""
    if tensor.dim() == 0:
        raise InputError("cannot quantize a scalar: give a tensor with at least one dimension")
    if tensor.numel() == 0:
        raise InputError(f"cannot quantize an empty tensor (shape {list(tensor.shape)}): leave it as it is")
    rows = tensor.detach().reshape(-1, tensor.shape[-1])
    if rows.dtype == torch.float32:
        return rows
    if work is None:
        return rows.float()
    return work.take("source", tuple(rows.shape), device=rows.device).copy_(rows)


def _check_quantizable(rows: torch.Tensor, fmt: NumberFormat) -> None:
    """The format fits the rows. Their values are checked per chunk, by :func:`_check_finite`, so a
    tensor with both a row length the group does not divide and a NaN is told about the length first."""
    if fmt.codec is None:
        raise InputError(f"{fmt.name} is a plain dtype, not a quantized format: cast instead")
    problem = fmt.group_problem(rows.shape[1])
    if problem:
        raise InputError(problem)


def _check_finite(stats: tuple[torch.Tensor, ...]) -> None:
    """NaN or inf anywhere in the blocks shows in their :func:`_block_stats` (``amin`` / ``amax``
    propagate NaN and an inf is an extreme), so the values need no pass of their own."""
    if not all(bool(torch.isfinite(stat).all()) for stat in stats):
        raise InputError("tensor has NaN or inf values, which no scale can represent: fix or exclude it")


def _blocks(rows: torch.Tensor, fmt: NumberFormat) -> torch.Tensor:
    """(rows, blocks, block) view of the values that share a scale."""
    block = fmt.group_size if fmt.granularity == Granularity.GROUP else rows.shape[1]
    return rows.reshape(rows.shape[0], -1, block)


def _block_reduce(values: torch.Tensor, fmt: NumberFormat, op) -> torch.Tensor:
    """``op`` (torch.amax / amin / sum) over each scale's block: (rows|1, blocks|1, 1)."""
    if fmt.granularity == Granularity.TENSOR:
        values = values.reshape(1, 1, -1)
    return op(values, dim=-1, keepdim=True)


def _tensor_scale(rows: torch.Tensor, fmt: NumberFormat) -> torch.Tensor | None:
    """NVFP4's fp32 global scale g, shape (1,): 448 * 6 / absmax, the package's ``generate_gparam``.

    g maps the tensor's absmax onto e4m3 max x e2m1 max, so every block scale g * absmax / 6 fits e4m3.
    The absmax is clamped to fp32's smallest normal first and a non-finite g (an all-zero tensor, or
    absmax below ~8e-36) becomes 1, as the package does; its blocks then flush to zero.
    """
    if not fmt.tensor_scale:
        return None
    low, high = torch.aminmax(rows)  # the absmax without a copy of |rows|; NaN propagates
    amax = torch.maximum(-low, high).clamp(min=torch.finfo(torch.float32).tiny)
    scale = (E4M3.max_finite * fmt.codec.max_finite) / amax  # 2688 / absmax, one float32 division
    return torch.nan_to_num(scale, nan=1.0, posinf=1.0, neginf=1.0).reshape(1)


def _choose_scales(blocks: torch.Tensor, fmt: NumberFormat, tensor_scale: torch.Tensor | None,
                   work: Workspace | None = None):
    """Stored (scale, zero point) per block: absmax, or the best clip ratio when ``:mse``."""
    return _scales_from_stats(blocks, _block_stats(blocks, fmt, work), fmt, tensor_scale)


def _scales_from_stats(blocks: torch.Tensor, stats: tuple, fmt: NumberFormat,
                       tensor_scale: torch.Tensor | None):
    """:func:`_choose_scales` from the blocks' :func:`_block_stats`."""
    if fmt.scale_search != "mse":
        return _scales_for_clip(stats, fmt, tensor_scale, 1.0)
    if fmt.granularity == Granularity.TENSOR:  # one block: stacking would hold 21 copies of the tensor
        return _search_one_by_one(blocks, stats, fmt, tensor_scale)
    return _search_stacked(blocks, stats, fmt, tensor_scale)


def _search_stacked(blocks: torch.Tensor, stats: tuple, fmt: NumberFormat, tensor_scale: torch.Tensor | None):
    """The ``:mse`` search with every ratio of :data:`MSE_CLIP_RATIOS` at once: the candidates' scales
    stacked on a new leading dimension, (ratios, rows, blocks, 1), their errors a few rows at a time.

    Memory: the stacked error temporary holds at most ``MSE_CHUNK_ELEMENTS`` float32 values per
    intra-op thread (:func:`_mse_chunk_elements`: 1 MiB a thread, reused from chunk to chunk; the
    codec's own temporaries for nf4 / fp4 elements are of that size too), or one row's candidates when a
    row alone is larger (21 x the row's length); scales, steps and errors add 21 values per block. Each
    thread's share stays in its core's cache, and Python runs once per chunk instead of once per ratio
    and operation. It is no faster than the loop at one thread (every candidate still costs 7 float32
    passes over the weights; ``docs/benchmarks.md``, "The :mse search"), but holds its memory bound.
    Integer formats on the CPU take the compiled search instead where numba is installed
    (:mod:`.mse_kernel`: the whole quantization 1.9-2.3x faster): it proves most blocks' choice from
    its own sums and leaves the near ties to torch's sums of their squared errors (:func:`_settle_undecided`).

    Result: bit for bit the one-ratio-at-a-time search (:func:`_search_one_by_one`): each candidate's
    scales and squared errors are the same float32 operations element by element, and the first
    smallest error along the ratios (:func:`_first_smallest`) is the ratio that loop kept (it replaced
    only on a strictly smaller error). tests/quant/test_mse.py checks it against that loop, kept there.
    """
    ratios = torch.tensor(MSE_CLIP_RATIOS, dtype=torch.float32, device=blocks.device).reshape(-1, 1, 1, 1)
    scale, zp = _scales_for_clip(stats, fmt, tensor_scale, ratios)
    decoded = _decoded_scale(scale, tensor_scale)
    zps = None if zp is None else zp.float()
    choice = _compiled_choice(blocks, decoded, zps, fmt)
    if choice is None:
        divisor = torch.where(decoded != 0, decoded, torch.ones_like(decoded))  # as _scaled: a zero step is 1
        best = _first_smallest(_stacked_errors(blocks, decoded, divisor, zps, fmt))
    else:
        best = _settle_undecided(choice)
    return _picked(scale, best), None if zp is None else _picked(zp, best)


def _picked(candidates: torch.Tensor, best: torch.Tensor) -> torch.Tensor:
    """Each block's chosen candidate of a stacked (ratios, rows, blocks, 1) tensor, as the search computed
    it (bits, not recomputed: float8 scales are gathered as bytes, which ``gather`` cannot take)."""
    float8 = candidates.is_floating_point() and candidates.element_size() == 1
    raw = candidates.view(torch.uint8) if float8 else candidates
    return raw.gather(0, best.unsqueeze(0)).squeeze(0).view(candidates.dtype)


def _compiled_choice(blocks: torch.Tensor, decoded: torch.Tensor, zp: torch.Tensor | None,
                     fmt: NumberFormat) -> mse_kernel.KernelChoice | None:
    """The compiled search's choice per block (:mod:`.mse_kernel`: integer codecs on the CPU), with the
    blocks it leaves undecided; None where it does not run."""
    codec = fmt.element_codec
    if not isinstance(codec, IntCodec):
        return None
    return mse_kernel.first_smallest(blocks, decoded, zp, codec.min_value, codec.max_finite)


def _settle_undecided(choice: mse_kernel.KernelChoice) -> torch.Tensor:
    """The compiled search's choice with its -1 blocks (near ties its bound could not decide) decided as
    the eager search decides them: the first smallest of torch's float32 sums of their squared errors,
    which the kernel computes bit for bit as :func:`_candidate_errors` does; only the sums' order is
    torch's own, so torch adds them, each block's n terms in a contiguous row as there (a row's sum does
    not depend on how many rows are summed with it). A few blocks at a time: the squared errors of
    ``_mse_chunk_elements()`` values at most (a float32 overflow can leave every block undecided)."""
    count, n = choice.undecided.numel(), choice.block_elements
    step = max(1, _mse_chunk_elements() // (len(MSE_CLIP_RATIOS) * n))
    for start in range(0, count, step):
        errors = choice.squared_errors(start, start + step).sum(dim=-1, keepdim=True)  # (ratios, some, 1)
        choice.best.view(-1)[choice.undecided[start:start + step]] = _first_smallest(errors).reshape(-1)
    return choice.best


def _stacked_errors(blocks: torch.Tensor, decoded: torch.Tensor, divisor: torch.Tensor,
                    zp: torch.Tensor | None, fmt: NumberFormat) -> torch.Tensor:
    """Every candidate's squared error per block, (ratios, rows, blocks, 1), a few rows at a time."""
    step = max(1, _mse_chunk_elements() // max(len(MSE_CLIP_RATIOS) * blocks[0].numel(), 1))
    buffer = blocks.new_empty((len(MSE_CLIP_RATIOS), min(step, blocks.shape[0]), *blocks.shape[1:]))
    errors = torch.empty_like(decoded)  # (ratios, rows, blocks, 1)
    for start in range(0, blocks.shape[0], step):
        rows = slice(start, start + step)
        steps = (decoded[:, rows], divisor[:, rows], None if zp is None else zp[:, rows])
        errors[:, rows] = _candidate_errors(blocks[rows], *steps, fmt, buffer)
    return errors


def _mse_chunk_elements() -> int:
    """Candidate x element values per stacked chunk: ``MSE_CHUNK_ELEMENTS`` for each intra-op thread,
    so each thread's share of an operation stays cache-sized while threads synchronise once per chunk."""
    return MSE_CHUNK_ELEMENTS * max(1, torch.get_num_threads())


def _first_smallest(errors: torch.Tensor) -> torch.Tensor:
    """Index along dim 0 of each block's smallest error, the earliest among equals: the one-by-one loop's
    rule (a later ratio replaces only on a strictly smaller error, so a NaN error never wins, and a NaN
    first error keeps index 0). Two computations of that rule, by size: up to
    :data:`ARGMIN_BLOCKS` blocks, ``argmin`` (the first of equal minima, as torch documents) with NaN as
    +inf, 4 operations (~20 us against ~125 us for the loop at 3 blocks: the compiled search's
    leftovers); beyond, a loop of ``where`` over the ratios (``argmin`` along the leading dim is 1.7x
    slower at 65k blocks here). tests/quant/test_mse.py checks both against each other on ties and NaN."""
    flat = errors.reshape(errors.shape[0], -1)
    if flat.shape[1] <= ARGMIN_BLOCKS:
        first = flat.nan_to_num(nan=math.inf).t().contiguous().argmin(dim=1)
        return torch.where(flat[0].isnan(), 0, first).reshape(errors.shape[1:])
    best_error, best = errors[0], torch.zeros_like(errors[0], dtype=torch.long)
    for index in range(1, errors.shape[0]):
        better = errors[index] < best_error
        best_error = torch.where(better, errors[index], best_error)
        best = best.masked_fill_(better, index)
    return best


def _candidate_errors(blocks: torch.Tensor, decoded: torch.Tensor, divisor: torch.Tensor,
                      zp: torch.Tensor | None, fmt: NumberFormat, buffer: torch.Tensor) -> torch.Tensor:
    """Squared error per block of every candidate: (ratios, rows, blocks, 1) float32, the same float32
    operations as :func:`_block_error` (integers: divided, rounded, clamped in float; native float8:
    clamped and cast, whose decode is exact) but written into ``buffer`` (reused) instead of fresh
    temporaries. ``decoded``: the float32 steps, (ratios, rows, blocks, 1); ``divisor``: the same with
    0 replaced by 1; ``zp``: the zero points as float32, or None."""
    codec = fmt.element_codec
    if not isinstance(codec, IntCodec) and codec not in NATIVE_FLOAT8:  # the codec allocates anyway
        values = codec.decode(_encode_blocks(blocks, fmt, decoded, zp))
    else:
        shape = (decoded.shape[0], *blocks.shape)
        values = buffer if buffer.shape == shape else buffer.new_empty(shape)  # the last chunk is short
        torch.div(blocks, divisor, out=values)
        if zp is not None:
            values.add_(zp)
        if isinstance(codec, IntCodec):
            values.round_().clamp_(codec.min_value, codec.max_finite)
        else:  # _encode_blocks' clamp and native cast, decoded by the native cast back (both exact)
            values.copy_(values.clamp_(-codec.max_finite, codec.max_finite).to(NATIVE_FLOAT8[codec]))
    if zp is not None:
        values.sub_(zp)
    values.mul_(decoded).sub_(blocks)
    return values.mul_(values).sum(dim=-1, keepdim=True)  # x * x: what ** 2 computes, bit for bit


def _search_one_by_one(blocks: torch.Tensor, stats: tuple, fmt: NumberFormat,
                       tensor_scale: torch.Tensor | None):
    """The ``:mse`` search one ratio at a time, keeping per block the candidate whose error is strictly
    smaller: for one per-tensor block, where stacking the candidates would cost 21 copies of it."""
    best = None
    for ratio in MSE_CLIP_RATIOS:
        scale, zp = _scales_for_clip(stats, fmt, tensor_scale, ratio)
        err = _block_error(blocks, fmt, scale, zp, tensor_scale)
        best = (err, scale, zp) if best is None else _keep_better(best, (err, scale, zp))
    return best[1], best[2]


def _keep_better(best: tuple, new: tuple) -> tuple:
    """Per block, keep whichever candidate has the smaller squared error."""
    better = new[0] < best[0]
    pick = [torch.where(better, n, b) if n is not None else None for n, b in zip(new, best, strict=True)]
    return tuple(pick)


def _block_error(blocks, fmt, scale, zp, tensor_scale) -> torch.Tensor:
    """Sum of squared quantization error per block for a candidate scale (or, with the candidates stacked
    on a leading dimension of ``scale``, for each): (candidates…, rows|1, blocks|1, 1) float32. Every
    step works in place on one fresh temporary, the same float32 operations as out of place."""
    decoded, codec = _decoded_scale(scale, tensor_scale), fmt.element_codec
    if isinstance(codec, IntCodec):  # codec.encode's round and clamp, kept in float: no int16 round trip
        values = _scaled(blocks, decoded, zp).round_().clamp_(codec.min_value, codec.max_finite)
    else:
        values = codec.decode(_encode_blocks(blocks, fmt, decoded, zp))
    if zp is not None:
        values.sub_(zp.float())
    return _block_reduce(values.mul_(decoded).sub_(blocks).square_(), fmt, torch.sum)


def _block_stats(blocks: torch.Tensor, fmt: NumberFormat,
                 work: Workspace | None = None) -> tuple[torch.Tensor, ...]:
    """What a block's scale depends on, computed once per search: (min, max) with zero included for
    asymmetric formats, the signed extreme for symmetric integers, the absmax otherwise (the
    magnitudes in ``work``'s ``scaled`` buffer when given)."""
    if not fmt.symmetric:
        return (_block_reduce(blocks, fmt, torch.amin).clamp(max=0),
                _block_reduce(blocks, fmt, torch.amax).clamp(min=0))
    if isinstance(fmt.codec, IntCodec) and not fmt.codec.restricted:
        return (_signed_extreme(blocks, fmt),)
    magnitudes = torch.abs(blocks) if work is None else \
        torch.abs(blocks, out=work.take("scaled", tuple(blocks.shape), device=blocks.device))
    return (_block_reduce(magnitudes, fmt, torch.amax),)


def _scales_for_clip(stats: tuple[torch.Tensor, ...], fmt, tensor_scale, ratio: float):
    """Scale (stored dtype) and zero point for blocks clipped to ``ratio`` of their range."""
    if not fmt.symmetric:
        return _asym_scales(stats, fmt, ratio)
    codec = fmt.codec
    if isinstance(codec, IntCodec) and not codec.restricted:
        extreme = stats[0] * ratio  # onto the most negative code: signed scale
        return _encode_scale(extreme / codec.min_value, extreme != 0, fmt), None
    amax = stats[0] * ratio
    ideal = amax / codec.max_finite
    if tensor_scale is not None:
        return _nvfp4_block_scale(ideal, tensor_scale), None
    return _encode_scale(ideal, amax > 0, fmt), None


def _nvfp4_block_scale(ideal: torch.Tensor, global_scale: torch.Tensor) -> torch.Tensor:
    """e4m3 block scales from ``ideal`` = block absmax / 6, the package's ``calculate_qparams`` order:
    fp32(g * ideal), clamped to e4m3's range, rounded to e4m3 (RNE); a 0 (an all-zero block, or one whose
    absmax is at most 6 * 2^-10 / g) becomes 0.125, so nothing divides by zero; its elements round to 0."""
    rounded = (global_scale * ideal).clamp(-E4M3.max_finite, E4M3.max_finite).to(torch.float8_e4m3fn)
    decoded = rounded.float()
    return torch.where(decoded == 0, torch.full_like(decoded, NVFP4_ZERO_SCALE), decoded).to(rounded.dtype)


def _signed_extreme(blocks: torch.Tensor, fmt: NumberFormat) -> torch.Tensor:
    """The value of largest magnitude in each block, with its sign: (rows|1, blocks|1, 1); where both signs
    reach it (max == -min), the first in the block, as ``argmax`` of the magnitudes picks. From ``amin``
    and ``amax`` (~10x faster here than that argmax, which runs only when such a tie exists, and than
    ``aminmax`` along a dim)."""
    values = blocks.reshape(1, 1, -1) if fmt.granularity == Granularity.TENSOR else blocks
    low, high = values.amin(dim=-1, keepdim=True), values.amax(dim=-1, keepdim=True)
    extreme = torch.where(-low > high, low, high)
    tied = (-low == high) & (high != 0)
    if bool(tied.any()):
        first = values.gather(-1, values.abs().argmax(dim=-1, keepdim=True))
        extreme = torch.where(tied, first, extreme)
    return extreme


def _asym_scales(stats: tuple[torch.Tensor, ...], fmt, ratio: float):
    """Asymmetric: [min, max] (zero included) spread over 0 .. 2^bits - 1, zero point rounded to it."""
    lo, hi = stats[0] * ratio, stats[1] * ratio
    qmax = fmt.element_codec.max_finite
    scale = _encode_scale((hi - lo) / qmax, hi > lo, fmt)
    zp = torch.round(-lo / scale.float()).clamp(0, qmax).to(torch.uint8)
    return scale, zp


def _encode_scale(ideal: torch.Tensor, nonzero: torch.Tensor, fmt: NumberFormat) -> torch.Tensor:
    """Round ideal scales to the scale format; an all-zero block gets scale 1 (``nonzero`` False)."""
    dtype = SCALE_DTYPES[fmt.scale_format]
    if fmt.scale_format == "e8m0":  # OCP MX: 2^(floor(log2 amax) - emax_elem)
        emax = math.floor(math.log2(fmt.codec.max_finite))
        exp = torch.floor(torch.log2(ideal * fmt.codec.max_finite)) - emax
        ideal = torch.exp2(exp.clamp(-127, 127))
    elif fmt.scale_format == "e4m3":
        ideal = ideal.clamp(max=E4M3.max_finite)
    else:  # float scales keep their sign (signed integer scales); magnitude within the dtype's range
        ideal = torch.sign(ideal) * ideal.abs().clamp(min=torch.finfo(dtype).tiny, max=torch.finfo(dtype).max)
    ideal = torch.where(nonzero, ideal, torch.ones_like(ideal))
    return ideal.to(dtype)


def _decoded_scale(scale: torch.Tensor, tensor_scale: torch.Tensor | None) -> torch.Tensor:
    """The float32 step of each block: the stored scale, or NVFP4's fp32(scale / g) (g a divisor)."""
    decoded = scale.float()
    return decoded / tensor_scale if tensor_scale is not None else decoded


def _encode_blocks(blocks, fmt, scale, zp) -> torch.Tensor:
    """Element codes for ``blocks / scale`` (+ zero point), clamped to the codec's range first."""
    return _encode_scaled(_scaled(blocks, scale, zp), fmt, values=False)


def _scaled(blocks: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor | None,
            out: torch.Tensor | None = None) -> torch.Tensor:
    """``blocks / scale (+ zero point)``: element values before rounding (a zero scale counts as 1),
    into ``out`` when given."""
    divisor = torch.where(scale != 0, scale, torch.ones_like(scale))
    scaled = torch.div(blocks, divisor) if out is None else torch.div(blocks, divisor, out=out)
    return scaled.add_(zp.float()) if zp is not None else scaled


def _store_codes(codes: torch.Tensor, fmt: NumberFormat) -> torch.Tensor:
    """Codes in their storage dtype: packed nibbles, int32 words (2, 3 bits), int8/uint8, or viewed as the
    float8 dtype."""
    if fmt.bits == 4:
        return pack_nibbles(codes)
    if fmt.bits < 8:  # 2, 3 bits: the low bits of each code, densely in int32 words (as on disk)
        return pack_bits((codes.to(torch.int16) & ((1 << fmt.bits) - 1)).to(torch.uint8), fmt.bits)
    if isinstance(fmt.element_codec, IntCodec):  # integers: signed int8, or uint8 for asymmetric
        return codes.to(torch.int8 if fmt.symmetric else torch.uint8)
    return codes.view(fmt.torch_dtype) if fmt.torch_dtype is not None else codes


def _decode_elements(qt: QuantizedTensor, rows: torch.Tensor | None) -> torch.Tensor:
    """float32 element values (rows, cols) before scaling."""
    data = qt.data if rows is None else qt.data[rows]
    if qt.fmt.bits == 8 and data.dtype != torch.uint8:
        return data.float()  # int8 and float8 storage convert natively (bit-exact, tested)
    return qt.fmt.element_codec.decode(qt.codes(rows)).reshape(data.shape[0], qt.shape[1])


def _select_rows(tensor: torch.Tensor | None, rows: torch.Tensor | None) -> torch.Tensor | None:
    """Scale rows for a row subset; per-tensor scales (one row) broadcast to every row."""
    if tensor is None or rows is None or tensor.shape[0] == 1:
        return tensor
    return tensor[rows]


def saturated_count(tensor: torch.Tensor, qt: QuantizedTensor) -> int:
    """How many values of ``tensor`` were clipped in ``qt``: beyond their codes' reach, not rounded.

    A value counts when, divided by its scale, it lies beyond what the scheme maps onto codes by
    rounding: symmetric integers ±(|most negative code| + 1/2) (the full-range short side reaches one
    step past its last code by design), asymmetric ones one step past either end (the zero point is
    rounded too), floats half the top binade's step past max (round to nearest lands on max anyway).
    What remains is real clipping: an ``:mse`` clip ratio, fp8 saturation.
    """
    blocks = _blocks(_as_rows(tensor), qt.fmt)  # (rows, blocks, block)
    scaled = _scaled(blocks, _decoded_scale(qt.scale, qt.tensor_scale), qt.zero_point)
    return _count_beyond_reach(scaled, qt.fmt.element_codec)


def _count_saturated(scaled: torch.Tensor, stats: tuple, decoded: torch.Tensor, zp: torch.Tensor | None,
                     fmt: NumberFormat) -> int:
    """:func:`saturated_count`'s number for the ``scaled`` values of blocks with these
    :func:`_block_stats`, without a pass over the values where the stats prove it 0 (absmax scales,
    the usual case): ``x / d (+ zp)`` is monotone in ``x`` and ``|x / d|`` is ``|x| / |d|``, so a
    block's scaled values lie within those of the extremes its stats bound it by."""
    low, high = _reach(fmt.element_codec)
    divisor = torch.where(decoded != 0, decoded, torch.ones_like(decoded))  # as _scaled divides
    if fmt.symmetric:  # stats[0]: the signed extreme or the absmax; the reach is symmetric
        proved = bool((stats[0].abs() / divisor.abs() <= min(-low, high)).all())
    else:  # stats: (min, max) with zero included, at least as far out as the block's own
        ends = stats[0] / divisor, stats[1] / divisor
        first, last = torch.minimum(*ends) + zp.float(), torch.maximum(*ends) + zp.float()
        proved = bool(((first >= low) & (last <= high)).all())
    return 0 if proved else _count_beyond_reach(scaled, fmt.element_codec)


def _count_beyond_reach(scaled: torch.Tensor, codec) -> int:
    """How many scaled values (before rounding) lie beyond :func:`_reach`."""
    low, high = _reach(codec)
    smallest, largest = torch.aminmax(scaled)
    if smallest >= low and largest <= high:  # the usual case, proved by one pass
        return 0
    return int(torch.count_nonzero((scaled < low) | (scaled > high)))


def _reach(codec) -> tuple[float, float]:
    """The scaled values the scheme maps onto the codec's codes without clipping (see above)."""
    if isinstance(codec, IntCodec):
        if codec.signed:
            return codec.min_value - 0.5, -codec.min_value + 0.5
        return -1.0, codec.max_finite + 1.0
    limit = rounding_threshold(codec.max_finite, codec.eps)
    return -limit, limit
