"""Chunked casting with damage counts, checked against torch's own casts and float64 truth."""

from __future__ import annotations

import math

import pytest
import torch

from dtypelab.checkpoint import ChunkCaster
from dtypelab.checkpoint.safetensors_file import DTYPE_CODES
from dtypelab.formats import NumberFormat, all_formats, get_format
from dtypelab.quant import TensorDamage
from dtypelab.quant.damage import saturates

TARGETS = [f for f in all_formats() if f.raw_castable and f.torch_dtype in DTYPE_CODES]


def cast_with(caster: ChunkCaster, source: torch.Tensor) -> tuple[torch.Tensor, TensorDamage]:
    """Feed ``source`` through the caster chunk by chunk, as the converter does."""
    raw = source.contiguous().view(torch.uint8)
    outputs, total = [], TensorDamage("t", "", "", "cast", source.numel())
    per_chunk = caster.chunk_elements
    for first in range(0, source.numel(), per_chunk):
        count = min(per_chunk, source.numel() - first)
        size = source.element_size()
        caster.raw[:count * size] = raw[first * size:(first + count) * size].numpy().tobytes()
        out, damage = caster.cast(source.dtype, count)
        outputs.append(torch.frombuffer(bytearray(out), dtype=caster.out_dtype))
        total = total.merged(damage)
    return torch.cat(outputs), total


def truth(source: torch.Tensor, dtype: torch.dtype) -> dict:
    """Damage counted directly, element by element, in float64."""
    x = source.double()
    cast = source.to(dtype).double()
    finite, nonzero = torch.isfinite(x), x != 0
    info = torch.finfo(dtype)
    # saturating formats: beyond max + half the top binade's step (2^floor(log2 max) * eps / 2), i.e.
    # past what round-to-nearest-even would round onto max anyway (e4m3fn: 448 + 16)
    limit = info.max + 2.0 ** math.floor(math.log2(info.max)) * info.eps / 2
    clamped = finite & (x.abs() > limit) if saturates(dtype) else torch.isinf(cast) & finite
    kept = finite & nonzero & ~clamped
    rel = ((cast - x).abs() / x.abs())[kept]
    return {"overflowed": int(clamped.sum()), "flushed_to_zero": int((nonzero & (cast == 0)).sum()),
            "subnormal": int(((cast != 0) & (cast.abs() < torch.finfo(dtype).smallest_normal)).sum()),
            "max_rel_error": float(rel.max()) if rel.numel() else 0.0}


def specials(dtype: torch.dtype) -> torch.Tensor:
    """Values around every edge of ``dtype``: overflow, rounding to max, subnormal, flush, zero, nan."""
    info = torch.finfo(dtype)
    tiny = info.smallest_normal * info.eps  # smallest subnormal
    return torch.tensor([0.0, -0.0, 1.0, -3.5, info.max, info.max * 1.001, -info.max * 4, tiny * 0.3,
                         -tiny * 0.3, tiny * 3, info.smallest_normal * 0.5, float("nan"), float("inf"),
                         1e-30, 1e30], dtype=torch.float64).clamp(-1e300, 1e300)


@pytest.mark.parametrize("fmt", TARGETS, ids=[f.name for f in TARGETS])
@pytest.mark.parametrize("source_dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_cast_matches_torch_and_counts_match_truth(fmt, source_dtype):
    torch.manual_seed(0)
    source = torch.cat([torch.randn(5000, dtype=torch.float64) * 10.0 ** torch.randint(-12, 12, (5000,)),
                        specials(fmt.torch_dtype)]).to(source_dtype)
    caster = ChunkCaster(fmt, chunk_elements=1024)  # several chunks, the last one partial
    out, damage = cast_with(caster, source)
    expected = source.clamp(-fmt.max_finite, fmt.max_finite) if saturates(fmt.torch_dtype) else source
    expected = expected.to(fmt.torch_dtype)
    assert torch.equal(out.view(torch.uint8), expected.view(torch.uint8))
    counted = truth(source, fmt.torch_dtype)
    assert damage.overflowed == counted["overflowed"]
    assert damage.flushed_to_zero == counted["flushed_to_zero"]
    assert damage.subnormal == counted["subnormal"]
    # computed in float32 (float64 for float64 sources) versus float64 truth: agree to float32 rounding
    assert damage.max_rel_error == pytest.approx(counted["max_rel_error"], rel=1e-6)


def test_fp16_edges_counted_by_hand():
    # 70000 and -1e5 overflow; 65519 rounds down to 65504; 1e-8 is below half the smallest
    # subnormal (2.98e-8) and flushes; 1e-6 lands subnormal (below 6.1e-5); 0.0 is no damage.
    source = torch.tensor([70000.0, -1e5, 65519.0, 1e-8, 1e-6, 0.0, 1.0])
    out, damage = cast_with(ChunkCaster(get_format("fp16")), source)
    assert (damage.overflowed, damage.flushed_to_zero, damage.subnormal) == (2, 1, 1)
    assert damage.max_rel_error == 1.0  # the flushed value lost all of itself
    assert damage.lost_values == 3
    assert out[2].item() == 65504.0


def test_bf16_keeps_range_of_float32():
    source = torch.tensor([3e38, 1e-37, 1.0 + 2**-9])  # fits bf16's 8-bit exponent; 1+2^-9 rounds
    _, damage = cast_with(ChunkCaster(get_format("bf16")), source)
    assert damage.lost_values == 0 and damage.subnormal == 0
    assert damage.max_rel_error <= get_format("bf16").eps / 2  # round to nearest: at most half an eps


def test_chunks_merge_to_the_same_damage_as_one_chunk():
    torch.manual_seed(1)
    source = torch.randn(10_000) * 1e5
    _, whole = cast_with(ChunkCaster(get_format("fp16"), chunk_elements=1 << 14), source)
    _, parts = cast_with(ChunkCaster(get_format("fp16"), chunk_elements=333), source)
    assert (whole.overflowed, whole.max_rel_error) == (parts.overflowed, parts.max_rel_error)
    assert whole.overflowed > 0


def fp8_e4m3() -> NumberFormat:
    """fp8 e4m3 stored as a plain cast, no scale (what convert writes for ``fp8_e4m3:cast``)."""
    return get_format("fp8_e4m3:cast")


def test_saturating_format_clamps_and_counts_by_hand():
    # e4m3fn has no inf: 448 is its largest value, so 1000 and -500 saturate (counted as overflowed);
    # its smallest subnormal is 2^-9, so 1e-4 (< 2^-10) flushes; 0.01 lands subnormal (< 2^-6).
    fmt = fp8_e4m3()
    assert saturates(fmt.torch_dtype)
    source = torch.tensor([1000.0, -500.0, 448.0, 1e-4, 0.01, 1.0, 0.0])
    out, damage = cast_with(ChunkCaster(fmt), source)
    assert out.float().tolist()[:3] == [448.0, -448.0, 448.0]
    assert (damage.overflowed, damage.flushed_to_zero, damage.subnormal) == (2, 1, 1)
    assert damage.max_rel_error == 1.0  # the flushed value


def test_e4m3_values_that_round_onto_448_are_not_counted_as_saturated():
    # e4m3fn's top binade steps by 32: 450, 460 and the tie 464 round to 448 under round-to-nearest-even
    # (as fp16 rounds 65519 to 65504); 470 and 1000 lie beyond and are saturated
    source = torch.tensor([450.0, 460.0, 464.0, 470.0, 1000.0])
    out, damage = cast_with(ChunkCaster(fp8_e4m3()), source)
    assert out.float().tolist() == [448.0] * 5
    assert damage.overflowed == 2
    assert damage.max_rel_error == pytest.approx(16 / 464)  # the largest among the rounded, not 1000's


# ------------------------------------------------------------------- flushes weighed against the scale

def embedding_with_one_tiny_value() -> torch.Tensor:
    """N(0, 0.02), 512 x 512, its magnitudes floored at 1e-4 (normal in fp16: nothing else flushes or
    falls subnormal), and one value 1e-9, which fp16 flushes (below half its smallest subnormal, 2^-25)."""
    torch.manual_seed(0)
    values = torch.randn(512, 512) * 0.02
    values = torch.where(values.abs() < 1e-4, torch.full_like(values, 1e-4), values)
    values[3, 7] = 1e-9
    return values


def test_a_flush_far_below_the_tensors_rms_is_negligible():
    source = embedding_with_one_tiny_value()
    out, damage = cast_with(ChunkCaster(get_format("fp16"), chunk_elements=1 << 14), source.reshape(-1))
    assert torch.equal(out.view(torch.uint8), source.reshape(-1).half().view(torch.uint8))  # same bytes
    assert (damage.overflowed, damage.flushed_to_zero, damage.subnormal) == (0, 1, 0)
    assert damage.lost_values == 1  # still a lost value, as before
    assert damage.max_flushed == torch.tensor(1e-9).item()  # the float32 nearest 1e-9
    assert damage.rms == pytest.approx(float(source.double().square().mean().sqrt()), rel=1e-6)
    assert damage.rms > 0.019  # ~0.02: the flushed value is ~5e-8 of it, far below 2^-10
    assert (damage.negligible_flushes, damage.significant_flushes) == (1, 0)


@pytest.mark.parametrize(("flushed", "negligible"), [(2.0 ** -26, False), (2.0 ** -28, True)])
def test_negligible_means_below_2_to_the_minus_10_of_the_rms(flushed, negligible):
    # 1023 values 2^-17 (fp16 subnormals, kept) and one below 2^-25 (flushed): RMS = 2^-17 * sqrt(1023/1024
    # + tiny), so the threshold is 2^-27 * 0.9995; 2^-26 lies above it, 2^-28 below
    source = torch.tensor([2.0 ** -17] * 1023 + [flushed])
    _, damage = cast_with(ChunkCaster(get_format("fp16")), source)
    assert (damage.flushed_to_zero, damage.subnormal) == (1, 1023)
    assert damage.rms == pytest.approx(2.0 ** -17 * math.sqrt(1023 / 1024), rel=1e-6)
    assert damage.negligible_flushes == int(negligible)
    assert damage.significant_flushes == int(not negligible)


def test_the_whole_tensors_rms_decides_not_the_chunks():
    # the first chunk alone would make its flush significant (as above); the tensor's RMS, ~0.707 with the
    # second chunk's ones, makes it negligible
    source = torch.tensor([2.0 ** -17] * 1023 + [2.0 ** -26] + [1.0] * 1024)
    _, damage = cast_with(ChunkCaster(get_format("fp16"), chunk_elements=1024), source)
    assert damage.rms == pytest.approx(math.sqrt((1024 + 1023 * 2.0 ** -34 + 2.0 ** -52) / 2048), rel=1e-6)
    assert (damage.flushed_to_zero, damage.negligible_flushes, damage.significant_flushes) == (1, 1, 0)
    _, first = cast_with(ChunkCaster(get_format("fp16"), chunk_elements=1024), source[:1024])
    assert first.significant_flushes == 1


def test_non_finite_values_leave_the_rms_finite_and_saturating_formats_weigh_flushes_too():
    # e4m3fn: 1e-4 flushes (below 2^-10); inf and NaN are left out of the RMS, 1000 (saturated) is in
    source = torch.tensor([1000.0, 1e-4, float("inf"), float("nan"), 1.0])
    _, damage = cast_with(ChunkCaster(fp8_e4m3()), source)
    assert damage.rms == pytest.approx(math.sqrt((1000.0 ** 2 + 1e-8 + 1.0) / 5), rel=1e-6)
    assert damage.max_flushed == torch.tensor(1e-4).item()
    assert (damage.flushed_to_zero, damage.negligible_flushes) == (1, 1)  # 1e-4 / 447 < 2^-10


# ------------------------------------------------------------------- the fast count and its screen

ZERO_CASES = {
    "zeros only": ([0.0, -0.0, 0.0], "zeros"),
    "normal values and zeros": ([1.5, 0.0, -2.25e-3, -0.0, 3e38], "zeros"),
    # 1e-44, a float32 subnormal, is stored as 0: the bits cannot tell, the relative error (-1) does
    "a flush among zeros": ([1.0, 0.0, 1e-44], "zeros"),
    "a subnormal among zeros": ([1.0, 0.0, 5e-39], None),  # below bf16's smallest normal 1.18e-38
    "no zero": ([1.0, -3.0, 7e-20], "normal"),
    "an inf": ([1.0, float("inf")], None),
}


@pytest.mark.parametrize("case", ZERO_CASES, ids=list(ZERO_CASES))
@pytest.mark.parametrize("spec", ["bf16", "fp16", "fp8_e5m2"])
def test_the_fast_count_equals_the_full_count(case, spec):
    """Each chunk counted by the fast path (where its screen allows) equals count_damage's full count."""
    values, _ = ZERO_CASES[case]
    torch.manual_seed(0)
    source = torch.cat([torch.tensor(values), torch.randn(300) * 0.02])
    fast_out, fast = cast_with(ChunkCaster(get_format(spec)), source)
    full_caster = ChunkCaster(get_format(spec))
    full_caster._fast_count = lambda *args: None  # the full count only
    full_out, full = cast_with(full_caster, source)
    assert torch.equal(fast_out.view(torch.uint8), full_out.view(torch.uint8))
    for field in ("overflowed", "flushed_to_zero", "subnormal", "max_rel_error", "max_flushed"):
        assert getattr(fast, field) == getattr(full, field), field
    assert fast.source_sq == pytest.approx(full.source_sq, rel=1e-6)  # one dot over other buffers


@pytest.mark.parametrize("case", ZERO_CASES, ids=list(ZERO_CASES))
def test_the_screen_proves_what_the_bf16_output_holds(case):
    values, expected = ZERO_CASES[case]
    caster = ChunkCaster(get_format("bf16"), chunk_elements=16)
    source = torch.tensor(values, dtype=torch.float32)
    caster._out_view[:len(values)].copy_(source)
    assert caster._screen(len(values)) == expected


def test_a_flush_the_bits_cannot_see_is_left_to_the_full_count():
    caster = ChunkCaster(get_format("bf16"), chunk_elements=16)
    source = torch.tensor([1.0, 0.0, 1e-44])
    caster._out_view[:3].copy_(source)
    back = caster._out_view[:3].float()
    assert caster._fast_count(source, back, torch.empty(3)) is None


# ------------------------------------------------------------------- stream: I/O beside the cast

def stream_through(caster: ChunkCaster, source: torch.Tensor):
    """``caster.stream`` over ``source``'s bytes: its outputs joined, and the damage."""
    raw, size, written = source.contiguous().view(torch.uint8).numpy().tobytes(), source.element_size(), []

    def read(view: memoryview, first: int) -> None:
        view[:] = raw[first * size:first * size + len(view)]

    damage = caster.stream(source.numel(), source.dtype, read, lambda out: written.append(bytes(out)))
    return torch.frombuffer(bytearray(b"".join(written)), dtype=caster.out_dtype), damage


@pytest.mark.parametrize("spec", ["bf16", "fp16", "fp8_e4m3:cast"])
def test_stream_equals_the_chunk_by_chunk_cast(spec):
    torch.manual_seed(2)
    source = torch.cat([torch.randn(5000) * 10.0 ** torch.randint(-8, 8, (5000,)), specials(torch.float16)])
    caster = ChunkCaster(get_format(spec), chunk_elements=512)
    streamed, damage = stream_through(caster, source.float())
    expected, counted = cast_with(ChunkCaster(get_format(spec), chunk_elements=512), source.float())
    assert torch.equal(streamed.view(torch.uint8), expected.view(torch.uint8))
    assert damage.numel == source.numel()
    for field in ("overflowed", "flushed_to_zero", "subnormal", "max_rel_error", "max_flushed", "source_sq"):
        assert getattr(damage, field) == getattr(counted, field), field  # same chunks, same merge order


def test_a_failing_read_stops_the_stream_with_its_error_and_writes_nothing_after_it():
    source = torch.randn(4096)
    caster = ChunkCaster(get_format("bf16"), chunk_elements=512)
    written = []
    raw = source.numpy().tobytes()

    def read(view: memoryview, first: int) -> None:
        if first >= 2048:
            raise OSError("the disk went away")
        view[:] = raw[first * 4:first * 4 + len(view)]

    with pytest.raises(OSError, match="went away"):
        caster.stream(source.numel(), source.dtype, read, lambda out: written.append(bytes(out)))
    # the four chunks before element 2048, in order, and nothing after it
    expected = source[:len(written) * 512].to(torch.bfloat16).view(torch.int16).numpy().tobytes()
    assert len(written) == 4 and b"".join(written) == expected


def test_the_rms_of_huge_values_is_finite_and_right():
    """|x| = 2^70: squares past float32's range, summed in float64 (issue 18 item 6)."""
    source = torch.full((1000,), 2.0 ** 70)
    _, damage = cast_with(ChunkCaster(get_format("bf16"), chunk_elements=256), source)
    assert damage.rms == 2.0 ** 70


@pytest.mark.parametrize("spec", ["int4:g32", "int8:channel:asym"])
@pytest.mark.parametrize("source_dtype", [torch.float32, torch.bfloat16])
def test_chunks_counted_on_the_second_thread_equal_the_count_done_at_once(spec, source_dtype, monkeypatch):
    """Each chunk's damage counted while the next chunk is read and quantized (two buffer sets) equals
    quantize_counted's, field for field. The count is held back until the following chunk has been
    quantized, so a count reading buffers that chunk reused would differ."""
    import threading

    import dtypelab.checkpoint.streaming as streaming
    from dtypelab.checkpoint import ChunkQuantizer
    from dtypelab.quant import quantize_counted

    fmt = get_format(spec)
    g = torch.Generator().manual_seed(3)
    rows = [torch.randn(32, 256, generator=g).mul(0.1 * (i + 1)).to(source_dtype) for i in range(5)]
    rows[2][0, :7] = 0.0  # exact zeros: the relative error's 0 / 0 path
    quantized = [threading.Event() for _ in rows]  # chunk i quantized
    real, order = streaming.read_back_damage, iter(range(len(rows)))

    def held_back(back, workspace):  # the counts run one by one, in order, on the counting thread
        index = next(order)
        if index + 1 < len(rows):
            assert quantized[index + 1].wait(timeout=30)  # the next chunk was quantized meanwhile
        return real(back, workspace)

    monkeypatch.setattr(streaming, "read_back_damage", held_back)
    quantizer, counts = ChunkQuantizer(fmt), []
    with streaming.one_thread(), quantizer.counting(len(rows)):  # as convert runs it: one torch thread
        for index, chunk in enumerate(rows):
            if index:
                quantizer.next_chunk()
            view = quantizer.buffer(chunk.numel() * chunk.element_size())
            view[:] = chunk.contiguous().view(torch.uint8).reshape(-1).numpy().tobytes()
            counts.append(quantizer.quantize(source_dtype, *chunk.shape)[1])
            quantized[index].set()
        assert quantizer._counter is not None  # the second thread really counted
    with streaming.one_thread():  # the dot products' sums depend on BLAS's thread count
        for chunk, count in zip(rows, counts, strict=True):
            assert count.result() == quantize_counted(chunk, fmt)[1]


def test_one_chunk_or_several_torch_threads_count_inline_in_the_first_buffers():
    """No second thread where it cannot gain: a one-chunk tensor, or torch on more than one thread (two
    teams would share the cores); and a one-chunk tensor always uses the first set of buffers, so a large
    :tensor / NVFP4 weight never grows both."""
    from dtypelab.checkpoint import ChunkQuantizer
    from dtypelab.checkpoint.streaming import one_thread

    quantizer = ChunkQuantizer(get_format("int4:g32"))
    with one_thread():
        with quantizer.counting(2):
            assert quantizer._counter is not None
            quantizer.next_chunk()
        for chunks in (1, 1):
            with quantizer.counting(chunks):
                assert quantizer._counter is None and quantizer.workspace is quantizer._sets[0].workspace
    saved = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        with quantizer.counting(5):
            assert quantizer._counter is None
            weight = torch.randn(32, 64)
            damage = quantizer.quantize_rows(weight)[1]
            assert damage.done() and damage.result() == quantize_counted_damage(weight, "int4:g32")
            assert quantizer._counter is None
    finally:
        torch.set_num_threads(saved)


def quantize_counted_damage(weight: torch.Tensor, spec: str) -> TensorDamage:
    from dtypelab.quant import quantize_counted

    return quantize_counted(weight, get_format(spec))[1]
