"""The compiled :mse search (``dtypelab.quant.mse_kernel``): its squared errors are the eager search's bit
for bit, its sums stay within the bound its proof uses, and what it decides is what the eager search picks
(the reference search of ``test_mse.py``, one ratio at a time, is the truth for the stored bits)."""

from __future__ import annotations

import math
import sys

import numpy as np
import pytest
import torch
from test_mse import assert_same_storage, reference_quantize, weights

import dtypelab.quant
from dtypelab.errors import SettingError
from dtypelab.formats import IntCodec, get_format
from dtypelab.quant import mse_kernel, qtensor
from dtypelab.quant.qtensor import quantize_tensor

numba = pytest.importorskip("numba", reason="numba (the 'fast' extra) is not installed")
from dtypelab.quant import _mse_numba  # noqa: E402  (imports numba)

INT_SPECS = ["int4:g128:mse", "int4:g32:asym:mse", "int8:mse", "int3:g64:mse", "int2:g64:asym:mse"]


def candidates(w: torch.Tensor, spec: str):
    """(fmt, blocks, decoded, divisor, zp): the stacked search's candidates, as ``_search_stacked`` builds
    them."""
    fmt = get_format(spec)
    blocks = qtensor._blocks(w, fmt)
    ratios = torch.tensor(qtensor.MSE_CLIP_RATIOS).reshape(-1, 1, 1, 1)
    scale, zp = qtensor._scales_for_clip(qtensor._block_stats(blocks, fmt), fmt, None, ratios)
    decoded = qtensor._decoded_scale(scale, None)
    divisor = torch.where(decoded != 0, decoded, torch.ones_like(decoded))
    return fmt, blocks, decoded, divisor, None if zp is None else zp.float()


def eager_values(blocks, decoded, divisor, zp, codec) -> torch.Tensor:
    """The eager search's per-element squared errors (``_candidate_errors`` before its sum)."""
    values = blocks / divisor
    if zp is not None:
        values = values + zp
    values = values.round().clamp(codec.min_value, codec.max_finite)
    if zp is not None:
        values = values - zp
    values = values * decoded - blocks
    return values * values


@pytest.mark.parametrize("spec", INT_SPECS)
def test_the_squared_errors_are_the_eager_searchs_bit_for_bit(spec):
    """Every candidate's every squared error, including values exactly halfway between codes (where
    round-half-even decides), values clamped at both ends, and -0.0."""
    w = weights(24, 256, 7)
    w[5, :64] = torch.arange(64, dtype=torch.float32) * 0.0625 - 2.0  # exact halves of common steps
    w[6, :8] = -0.0
    fmt, blocks, decoded, divisor, zp = candidates(w, spec)
    codec = fmt.element_codec
    expected = eager_values(blocks, decoded, divisor, zp, codec)
    flat, n = blocks.reshape(-1, blocks.shape[-1]).numpy(), blocks.shape[-1]
    zps = torch.zeros_like(decoded) if zp is None else zp
    out = np.empty(n, np.float32)
    for k in range(decoded.shape[0]):
        got = np.empty_like(flat)
        steps = [t[k].reshape(-1).numpy() for t in (decoded, divisor, zps)]
        for b in range(flat.shape[0]):
            _mse_numba.squared_errors(flat[b], steps[0][b], steps[1][b], steps[2][b],
                                      np.float32(codec.min_value), np.float32(codec.max_finite), out)
            got[b] = out
        assert torch.equal(torch.from_numpy(got).view(torch.int32),
                           expected[k].reshape(flat.shape).contiguous().view(torch.int32))


@pytest.mark.parametrize("n", [32, 128, 384, 4096])
def test_torchs_sum_stays_within_the_bounds_of_the_kernels(n):
    """The proof's premise: the kernel's float64 sum K of non-negative float32 terms is their exact sum
    (math.fsum) to ~n 2^-53, and torch's float32 sum T lies within gamma_(n-1) (u = 2^-24) of it, so
    between ``lower(K)`` and ``upper(K)``. Terms spanning 12 decades, so torch's rounding really shows."""
    g = torch.Generator().manual_seed(n)
    terms = (torch.randn(2000, n, generator=g) * torch.logspace(-6, 6, n)).square()
    eager = terms.sum(dim=-1).double()
    kernel = torch.tensor([_mse_numba.exact_sum(row) for row in terms.numpy()], dtype=torch.float64)
    exact = torch.tensor([math.fsum(row) for row in terms.double().tolist()], dtype=torch.float64)
    assert bool(((kernel - exact).abs() <= n * 2.0 ** -53 * exact).all())
    gamma = _mse_numba.SLACK * (n - 1) * 2.0 ** -24 / (1 - (n - 1) * 2.0 ** -24)
    assert all(_mse_numba.lower(k, gamma) <= t <= _mse_numba.upper(k, gamma)
               for k, t in zip(kernel.tolist(), eager.tolist(), strict=True))
    assert not torch.equal(eager, kernel)  # otherwise this checks nothing about rounding


@pytest.mark.parametrize("spec", INT_SPECS)
@pytest.mark.parametrize(("rows", "cols", "seed"), [(96, 256, 0), (7, 1536, 1), (64, 384, 2)])
def test_decided_blocks_pick_the_reference_candidate(spec, rows, cols, seed, monkeypatch):
    """Straight from the kernel (no eager fill-in): every decided block's ratio is the eager stacked
    search's (itself checked against the one-by-one reference in test_mse.py), and the undecided are few
    (measured 0-0.8% of these blocks of outliers, ties and zero rows)."""
    monkeypatch.setenv("DTYPELAB_MSE_KERNEL", "always")
    w = weights(rows, cols, seed)
    fmt, blocks, decoded, divisor, zp = candidates(w, spec)
    codec = fmt.element_codec
    best = mse_kernel.first_smallest(blocks, decoded, divisor, zp, codec.min_value, codec.max_finite)
    reference = qtensor._first_smallest(qtensor._stacked_errors(blocks, decoded, divisor, zp, fmt))
    decided = best >= 0
    assert torch.equal(best[decided], reference[decided])
    assert decided.float().mean() > 0.98


def test_blocks_left_undecided_are_searched_eagerly(monkeypatch):
    """With every block left undecided (-1), the eager fill-in alone must store the reference's bits."""
    monkeypatch.setenv("DTYPELAB_MSE_KERNEL", "always")
    monkeypatch.setattr(mse_kernel, "_run", lambda *args: args[-1].fill(-1))
    for spec in ("int4:g128:mse", "int4:g32:asym:mse"):
        w = weights(40, 256, 8)
        assert_same_storage(quantize_tensor(w, get_format(spec)), reference_quantize(w, get_format(spec)))


def test_near_ties_are_left_to_the_eager_search():
    """Two candidates whose sums differ by less than the bound: the kernel must not choose. Block of
    one value 1.0 and 127 zeros: ratio 1.0 stores it exactly (error 0); a two-candidate table where
    the second candidate has the same error (0) with another step is a tie the bound cannot break."""
    block = np.zeros((1, 128), np.float32)
    block[0, 0] = 1.0
    steps = np.array([[0.125], [0.0625]], np.float32)  # (candidates, blocks): 1.0 is 8 or 16 steps, error 0
    best = np.empty(1, np.int64)
    _mse_numba.search(block, steps, steps.copy(), np.zeros_like(steps), -32.0, 31.0, best)
    assert best[0] == -1
    steps = np.array([[0.125], [0.125]], np.float32)  # the same candidate twice: the first, decided
    _mse_numba.search(block, steps, steps.copy(), np.zeros_like(steps), -32.0, 31.0, best)
    assert best[0] == 0


@pytest.mark.parametrize("spec", ["int4:g32:mse", "int4:g32:asym:mse"])
@pytest.mark.parametrize("threads", [1, 2])
def test_the_thread_split_changes_nothing(threads, spec, monkeypatch):
    """Blocks split across threads (each a column slice of the candidates' steps and zero points)."""
    monkeypatch.setenv("DTYPELAB_MSE_KERNEL", "always")
    monkeypatch.setattr(mse_kernel, "MIN_BLOCKS_PER_THREAD", 16)
    slices = []

    class Counting:  # the kernel module, counting the slices it is given
        @staticmethod
        def search(blocks, *args):
            slices.append(blocks.shape[0])
            return _mse_numba.search(blocks, *args)

    monkeypatch.setitem(mse_kernel._state, "module", Counting)
    w = weights(96, 1024, 9)
    saved = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        assert_same_storage(quantize_tensor(w, get_format(spec)), reference_quantize(w, get_format(spec)))
    finally:
        torch.set_num_threads(saved)
    blocks = 96 * 1024 // get_format(spec).group_size
    assert sum(slices) == blocks and len(slices) == threads


def test_a_forked_child_starts_its_own_pool(monkeypatch):
    """A fork keeps the parent's pool object but not its threads: the child must not submit to it."""
    monkeypatch.setitem(mse_kernel._state, "pool", None)
    monkeypatch.setitem(mse_kernel._state, "pool_size", 0)
    with mse_kernel._pool_lock:
        parent = mse_kernel._pool(2)
    mse_kernel._forget_pool()  # what os.register_at_fork runs in the child
    assert mse_kernel._state["pool"] is None and not mse_kernel._pool_lock.locked()
    with mse_kernel._pool_lock:
        child = mse_kernel._pool(2)
    assert child is not parent
    parent.shutdown()
    child.shutdown()


def test_auto_mode_loads_the_kernel_only_once_the_eager_search_has_paid_for_it(monkeypatch):
    monkeypatch.delenv("DTYPELAB_MSE_KERNEL", raising=False)
    monkeypatch.setitem(mse_kernel._state, "module", None)
    monkeypatch.setitem(mse_kernel._state, "eager_elements", 0)
    monkeypatch.setattr(mse_kernel, "LOAD_AFTER_ELEMENTS", 3 * 64 * 256)
    fmt, blocks, decoded, divisor, zp = candidates(weights(64, 256, 10), "int4:g128:mse")
    args = (blocks, decoded, divisor, zp, -8, 7)
    assert [mse_kernel.first_smallest(*args) is None for _ in range(4)] == [True, True, True, False]


def test_never_and_other_devices_search_eagerly(monkeypatch):
    fmt, blocks, decoded, divisor, zp = candidates(weights(8, 256, 11), "int4:g128:mse")
    monkeypatch.setenv("DTYPELAB_MSE_KERNEL", "always")
    assert mse_kernel.first_smallest(blocks.to("meta"), decoded, divisor, zp, -8, 7) is None
    monkeypatch.setenv("DTYPELAB_MSE_KERNEL", "never")
    assert mse_kernel.first_smallest(blocks, decoded, divisor, zp, -8, 7) is None


def test_a_bad_mode_or_a_missing_numba_is_one_clear_error(monkeypatch):
    fmt, blocks, decoded, divisor, zp = candidates(weights(8, 256, 12), "int4:g128:mse")
    monkeypatch.setenv("DTYPELAB_MSE_KERNEL", "fast")
    with pytest.raises(SettingError, match="auto, always, never"):
        mse_kernel.first_smallest(blocks, decoded, divisor, zp, -8, 7)
    monkeypatch.setenv("DTYPELAB_MSE_KERNEL", "always")
    monkeypatch.setattr(mse_kernel, "available", lambda: False)
    with pytest.raises(SettingError, match=r"pip install 'dtypelab\[fast\]'"):
        mse_kernel.first_smallest(blocks, decoded, divisor, zp, -8, 7)


def test_a_kernel_that_cannot_load_leaves_the_eager_search(monkeypatch):
    """numba installed but its module failing to load (a numpy it does not take, no cache folder): auto
    searches eagerly with the same codes; always says why, in one line."""
    fmt, blocks, decoded, divisor, zp = candidates(weights(8, 256, 15), "int4:g128:mse")
    monkeypatch.setitem(mse_kernel._state, "module", None)
    monkeypatch.setitem(sys.modules, "dtypelab.quant._mse_numba", None)  # makes the import fail
    monkeypatch.delattr(dtypelab.quant, "_mse_numba")
    monkeypatch.setenv("DTYPELAB_MSE_KERNEL", "always")
    with pytest.raises(SettingError, match="could not be loaded"):
        mse_kernel.first_smallest(blocks, decoded, divisor, zp, -8, 7)
    monkeypatch.setenv("DTYPELAB_MSE_KERNEL", "auto")
    monkeypatch.setitem(mse_kernel._state, "eager_elements", mse_kernel.LOAD_AFTER_ELEMENTS)
    assert mse_kernel.first_smallest(blocks, decoded, divisor, zp, -8, 7) is None
    assert mse_kernel._state["module"] is False  # remembered: no second attempt
    w = weights(16, 256, 15)
    assert_same_storage(quantize_tensor(w, fmt), reference_quantize(w, fmt))


def test_only_integer_codecs_take_the_kernel(monkeypatch):
    """Float elements (nf4, fp4, fp8) decode through their codec's table: the eager search serves them."""
    monkeypatch.setenv("DTYPELAB_MSE_KERNEL", "always")
    called = []
    monkeypatch.setattr(mse_kernel, "_run", lambda *args: called.append(1) or args[-1].fill(-1))
    w = weights(16, 256, 13)
    quantize_tensor(w, get_format("nf4:mse"))
    assert not called
    quantize_tensor(w, get_format("int4:g128:mse"))
    assert called and isinstance(get_format("int4:g128:mse").element_codec, IntCodec)
