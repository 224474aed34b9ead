"""The ``:mse`` clip search (issue 16 item 3): every candidate ratio evaluated in one stacked pass per chunk
of rows, with exactly the codes, scales and zero points of the one-candidate-at-a-time search it replaced.

Truth: :func:`reference_quantize` below, the search as it was before the stacked pass — each ratio of
1.0, 0.975 … 0.5 in turn, its squared error per block, kept only where strictly smaller — written out
here so that a change to the module cannot change the truth with it. It shares with the module only the
per-candidate scale rule (``_block_stats``, ``_scales_for_clip``) and the final encoding, which the search
does not touch. Comparisons are ``torch.equal`` on the stored bits: no tolerance.
"""

from __future__ import annotations

import pytest
import torch

from dtypelab.formats import Granularity, IntCodec, get_format
from dtypelab.quant import mse_kernel, qtensor
from dtypelab.quant.qtensor import quantize_tensor

SPECS = ["int4:g128:mse", "int4:g32:asym:mse", "int8:mse", "fp8_e4m3:mse", "nvfp4:mse", "int3:g64:mse",
         "mxfp4:mse", "nf4:mse", "int2:g64:asym:mse", "int8:tensor:mse"]
REFERENCE_RATIOS = tuple(1.0 - 0.025 * i for i in range(21))  # the search's candidates, as they were


def reference_quantize(tensor: torch.Tensor, fmt) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(stored codes, scale, zero point) by the slow search: one candidate ratio at a time."""
    rows = tensor.detach().float().reshape(-1, tensor.shape[-1])
    tensor_scale = qtensor._tensor_scale(rows, fmt)
    blocks = qtensor._blocks(rows, fmt)
    stats = qtensor._block_stats(blocks, fmt)
    best = None
    for ratio in REFERENCE_RATIOS:
        scale, zp = qtensor._scales_for_clip(stats, fmt, tensor_scale, ratio)
        err = _reference_error(blocks, fmt, scale, zp, tensor_scale)
        if best is None:
            best = (err, scale, zp)
            continue
        better = err < best[0]  # strictly: ties keep the earlier (larger) ratio
        best = tuple(None if n is None else torch.where(better, n, b)
                     for n, b in zip((err, scale, zp), best, strict=True))
    scale, zp = best[1], best[2]
    step = scale.float() / tensor_scale if tensor_scale is not None else scale.float()
    codes = qtensor._encode_blocks(blocks, fmt, step, zp)
    return qtensor._store_codes(codes.reshape(rows.shape), fmt), scale, zp


def _reference_error(blocks, fmt, scale, zp, tensor_scale) -> torch.Tensor:
    """Squared error per block of one candidate, as the search computed it (rounded in float for integers,
    through the codec for the rest)."""
    step = scale.float() / tensor_scale if tensor_scale is not None else scale.float()
    codec = fmt.element_codec
    scaled = blocks / torch.where(step != 0, step, torch.ones_like(step))
    scaled = scaled + zp.float() if zp is not None else scaled
    if isinstance(codec, IntCodec):
        values = torch.round(scaled).clamp_(codec.min_value, codec.max_finite)
    else:
        values = codec.decode(qtensor._encode_blocks(blocks, fmt, step, zp))
    if zp is not None:
        values = values - zp.float()
    err = (values * step - blocks) ** 2
    if fmt.granularity == Granularity.TENSOR:
        err = err.reshape(1, 1, -1)
    return err.sum(dim=-1, keepdim=True)


@pytest.fixture(autouse=True, params=["never", "always"])
def search_mode(request, monkeypatch) -> str:
    """Every test here runs with the eager search and with the compiled one (``mse_kernel``: integer
    formats; the others search eagerly either way): one truth for both."""
    if request.param == "always" and not mse_kernel.available():
        pytest.skip("numba (the 'fast' extra) is not installed: the compiled search cannot run")
    monkeypatch.setenv("DTYPELAB_MSE_KERNEL", request.param)
    return request.param


def weights(rows: int, cols: int, seed: int) -> torch.Tensor:
    """Gaussian rows with heavy-tailed outliers (so clipping pays and many ratios win somewhere), an
    all-zero row, a constant row and a row of one spike (every ratio ties there: the first must win)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * torch.rand(rows, 1, generator=g).add(0.05)
    spikes = torch.rand(rows, cols, generator=g) < 0.01
    w = torch.where(spikes, w * torch.empty(rows, cols).exponential_(0.2, generator=g), w)
    w[1] = 0.0
    w[2] = 0.3
    w[3] = 0.0
    w[3, 5] = -2.0
    return w


def as_bits(t: torch.Tensor | None) -> torch.Tensor | None:
    """The stored bits: float8 scales compare as bytes (torch.equal does not take every float8 dtype)."""
    if t is None or t.element_size() != 1:
        return t
    return t.view(torch.uint8)


def assert_same_storage(qt, expected) -> None:
    data, scale, zp = expected
    assert torch.equal(as_bits(qt.data), as_bits(data))
    assert torch.equal(as_bits(qt.scale), as_bits(scale))
    assert (qt.zero_point is None) == (zp is None)
    if zp is not None:
        assert torch.equal(qt.zero_point, zp)


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize(("rows", "cols", "seed"), [(96, 256, 0), (7, 1536, 1), (64, 384, 2)])
def test_the_stacked_search_stores_the_one_by_one_searchs_codes(spec, rows, cols, seed):
    fmt = get_format(spec)
    w = weights(rows, cols, seed)
    assert_same_storage(quantize_tensor(w, fmt), reference_quantize(w, fmt))


@pytest.mark.parametrize("spec", ["int4:g128:sfp32:mse", "int4:g32:asym:sbf16:mse", "int8:mse"])
def test_weights_whose_errors_add_up_past_float32_store_the_reference(spec):
    """Weights near 3e19 under float32 / bf16 scales: every squared error is finite, but a block's sum
    passes float32's 3.4e38, so torch's sums are inf for several candidates and the first of them wins.
    The compiled search must leave such blocks to the eager one (its float64 sums stay finite)."""
    w = weights(8, 256, 14) * 3e19
    assert_same_storage(quantize_tensor(w, get_format(spec)), reference_quantize(w, get_format(spec)))


@pytest.mark.parametrize("spec", ["int4:g128:mse", "int4:g32:asym:mse", "nvfp4:mse", "int8:mse"])
def test_chunks_of_a_few_rows_change_nothing(spec, monkeypatch):
    """Chunks of 3 candidate-rows (the last one short) search exactly as one chunk of everything."""
    fmt = get_format(spec)
    w = weights(50, 256, 3)
    monkeypatch.setattr(qtensor, "_mse_chunk_elements", lambda: 3 * 256 * len(qtensor.MSE_CLIP_RATIOS))
    assert_same_storage(quantize_tensor(w, fmt), reference_quantize(w, fmt))


@pytest.mark.parametrize("spec", ["int4:g128:mse", "int4:g32:asym:mse", "int3:g64:mse", "nvfp4:mse"])
def test_the_weights_make_the_search_choose(spec):
    """The equality above means something only if the search picks clip ratios other than 1.0 on these
    weights: at least a tenth of the blocks must store a different scale than absmax does. (mxfp4's
    power-of-two scales halve at best within the ratios searched, which never pays on these weights, nor
    does clipping int8 rows of 256 levels.)"""
    w = weights(96, 256, 0)
    searched, plain = quantize_tensor(w, get_format(spec)), quantize_tensor(w, get_format(spec[:-4]))
    changed = (as_bits(searched.scale) != as_bits(plain.scale)).float().mean().item()
    assert changed > 0.1


def test_gptq_s_one_group_call_is_the_same_search():
    """GPTQ chooses each group's scale through ``_choose_scales`` on (rows, 1, group) blocks."""
    fmt = get_format("int4:g32:mse")
    w = weights(40, 32, 4)
    scale, zp = qtensor._choose_scales(w.reshape(40, 1, 32), fmt, None)
    _, expected_scale, expected_zp = reference_quantize(w, fmt)
    assert torch.equal(scale, expected_scale) and zp is None and expected_zp is None


def test_the_candidate_memory_stays_within_the_bound(monkeypatch):
    """Every stacked temporary of the eager search holds at most the chunk's values (MSE_CHUNK_ELEMENTS a
    thread); the compiled search holds one block's squared errors."""
    monkeypatch.setenv("DTYPELAB_MSE_KERNEL", "never")
    fmt = get_format("int4:g32:mse")
    w = weights(64, 256, 5)
    seen = []
    original = qtensor._candidate_errors

    def spy(blocks, *args):
        seen.append(blocks.shape[0] * blocks[0].numel() * len(qtensor.MSE_CLIP_RATIOS))
        return original(blocks, *args)

    monkeypatch.setattr(qtensor, "_candidate_errors", spy)
    monkeypatch.setattr(qtensor, "MSE_CHUNK_ELEMENTS", 10 * 256 * len(qtensor.MSE_CLIP_RATIOS))
    monkeypatch.setattr(qtensor.torch, "get_num_threads", lambda: 1)
    quantize_tensor(w, fmt)
    assert len(seen) == 7  # 64 rows in chunks of 10
    assert max(seen) <= qtensor.MSE_CHUNK_ELEMENTS
    seen.clear()
    monkeypatch.setattr(qtensor.torch, "get_num_threads", lambda: 2)  # twice the rows per chunk
    quantize_tensor(w, fmt)
    assert len(seen) == 4 and max(seen) <= 2 * qtensor.MSE_CHUNK_ELEMENTS


def test_the_signed_extreme_is_the_first_largest_magnitude():
    """Symmetric integer scales start from each block's value of largest magnitude with its sign; where
    +m and -m both occur, the first one in the block (the argmax rule it replaced), any zero block 0."""
    fmt = get_format("int4:g32")
    w = weights(16, 64, 6)
    w[4, :32] = torch.linspace(-1, 1, 32)  # -1 first
    w[5, :32] = torch.linspace(1, -1, 32)  # +1 first
    w[6, 32:] = torch.tensor([0.5, -0.5] * 16)
    blocks = qtensor._blocks(w, fmt)
    truth = blocks.gather(-1, blocks.abs().argmax(dim=-1, keepdim=True))
    extreme = qtensor._signed_extreme(blocks, fmt)
    assert torch.equal(extreme, truth)
    assert extreme[4, 0, 0] == -1 and extreme[5, 0, 0] == 1 and extreme[6, 1, 0] == 0.5


@pytest.mark.parametrize("blocks", [3, 500])
def test_both_computations_of_the_first_smallest_error_agree(blocks, monkeypatch):
    """The argmin (small) and the where-loop (large) forms of one rule: ties keep the earliest, a NaN
    never wins, a NaN first error keeps index 0; checked on both sides of ARGMIN_BLOCKS by moving it."""
    g = torch.Generator().manual_seed(blocks)
    errors = torch.rand(21, blocks, 1, 1, generator=g).round(decimals=1)  # many exact ties
    errors[3, ::7] = float("nan")
    errors[0, ::11] = float("nan")
    errors[:, ::13] = float("inf")
    expected = torch.zeros(blocks, 1, 1, dtype=torch.long)
    for b in range(blocks):  # the rule, one block at a time
        best = errors[0, b, 0, 0]
        for k in range(1, 21):
            if errors[k, b, 0, 0] < best:
                best, expected[b, 0, 0] = errors[k, b, 0, 0], k
    for limit in (0, 1 << 30):  # every block count above, then below, the switch
        monkeypatch.setattr(qtensor, "ARGMIN_BLOCKS", limit)
        assert torch.equal(qtensor._first_smallest(errors), expected)
