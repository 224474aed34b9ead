"""The compiled :mse search (``dtypelab.quant.mse_kernel``): its squared errors are the eager search's bit
for bit, its sums stay within the bound its proof uses, and what it decides is what the eager search picks
(the reference search of ``test_mse.py``, one ratio at a time, is the truth for the stored bits)."""

from __future__ import annotations

import math
import multiprocessing
import os
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
    out, code_range = np.empty(n, np.float32), (np.float32(codec.min_value), np.float32(codec.max_finite))
    for k in range(decoded.shape[0]):
        got, got_symmetric = np.empty_like(flat), np.empty_like(flat)
        steps = [t[k].reshape(-1).numpy() for t in (decoded, divisor, zps)]
        for b in range(flat.shape[0]):
            _mse_numba.squared_errors(flat[b], steps[0][b], steps[1][b], steps[2][b], *code_range, out)
            got[b] = out
            if zp is None:  # the path the kernel takes where every zero point is 0
                _mse_numba.squared_errors_symmetric(flat[b], steps[0][b], steps[1][b], *code_range, out)
                got_symmetric[b] = out
        reference = expected[k].reshape(flat.shape).contiguous().view(torch.int32)
        assert torch.equal(torch.from_numpy(got).view(torch.int32), reference)
        if zp is None:
            assert torch.equal(torch.from_numpy(got_symmetric).view(torch.int32), reference)


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
    choice = mse_kernel.first_smallest(blocks, decoded, zp, codec.min_value, codec.max_finite)
    reference = qtensor._first_smallest(qtensor._stacked_errors(blocks, decoded, divisor, zp, fmt))
    decided = choice.best >= 0
    assert torch.equal(choice.best[decided], reference[decided])
    assert decided.float().mean() > 0.98
    assert torch.equal(choice.undecided, (~decided).reshape(-1).nonzero().reshape(-1))


@pytest.mark.parametrize("spec", ["int4:g32:mse", "int4:g32:asym:mse"])
def test_the_undecided_blocks_come_with_the_eager_searchs_squared_errors(spec, monkeypatch):
    """Every block left undecided (the bound patched to decide nothing): their candidates' squared errors,
    which torch then sums, are the eager search's terms bit for bit, block by block in index order."""
    monkeypatch.setenv("DTYPELAB_MSE_KERNEL", "always")
    monkeypatch.setattr(mse_kernel, "_run", lambda *args: args[-1].fill(-1))
    fmt, blocks, decoded, divisor, zp = candidates(weights(6, 256, 16), spec)
    codec = fmt.element_codec
    choice = mse_kernel.first_smallest(blocks, decoded, zp, codec.min_value, codec.max_finite)
    count, n = decoded.shape[0], blocks.shape[-1]
    expected = eager_values(blocks, decoded, divisor, zp, codec).reshape(count, -1, n)
    assert torch.equal(choice.undecided, torch.arange(expected.shape[1]))
    got = choice.squared_errors(0, choice.undecided.numel())
    assert torch.equal(got.view(torch.int32), expected.contiguous().view(torch.int32))
    middle = choice.squared_errors(3, 5)  # a slice of the undecided: those blocks' errors alone
    assert torch.equal(middle.view(torch.int32), expected[:, 3:5].contiguous().view(torch.int32))


@pytest.mark.parametrize("chunk_elements", [qtensor.MSE_CHUNK_ELEMENTS, 21 * 32 * 3])
def test_blocks_left_undecided_are_settled_by_torchs_sums(chunk_elements, monkeypatch):
    """With every block left undecided (-1), torch's sums of the kernel's squared errors alone must store
    the reference's bits, also when they are taken a few blocks at a time (a small chunk budget)."""
    monkeypatch.setenv("DTYPELAB_MSE_KERNEL", "always")
    monkeypatch.setattr(mse_kernel, "_run", lambda *args: args[-1].fill(-1))
    monkeypatch.setattr(qtensor, "MSE_CHUNK_ELEMENTS", chunk_elements)
    for spec in ("int4:g128:mse", "int4:g32:asym:mse"):
        w = weights(40, 256, 8)
        assert_same_storage(quantize_tensor(w, get_format(spec)), reference_quantize(w, get_format(spec)))


def test_asymmetric_blocks_whose_zero_points_are_all_zero_skip_them_with_the_same_bits(monkeypatch):
    """Non-negative weights under an asymmetric format: every zero point is 0, so the kernel takes the
    symmetric squared error; the stored bits must still be the reference's."""
    monkeypatch.setenv("DTYPELAB_MSE_KERNEL", "always")
    w, fmt = weights(48, 256, 20).abs(), get_format("int4:g32:asym:mse")
    assert not reference_quantize(w, fmt)[2].any()
    assert_same_storage(quantize_tensor(w, fmt), reference_quantize(w, fmt))


def test_blocks_too_long_for_the_bound_are_all_left_to_torch():
    """n - 1 >= 2^23 values a block: (n - 1) u >= 1/2 and gamma means nothing (or divides by zero)."""
    block = np.ones((1, (1 << 23) + 2), np.float32)
    steps = np.array([[0.125], [0.25]], np.float32)
    best = np.zeros(1, np.int64)
    _mse_numba.search(block, steps, np.zeros_like(steps), -8.0, 7.0, best)
    assert best[0] == -1


def test_a_zero_step_divides_by_one_as_in_the_eager_search(monkeypatch):
    """A candidate whose step is 0 (an e4m3 scale that underflowed, say): the eager search divides by 1
    there (and multiplies back by 0); the kernel must score it the same, decided or not."""
    monkeypatch.setenv("DTYPELAB_MSE_KERNEL", "always")
    fmt = get_format("int4:g32:mse")
    blocks = weights(8, 64, 19)[:2].reshape(2, 2, 32)
    decoded = torch.tensor([0.0, 0.05, 0.1, 0.0]).reshape(-1, 1, 1, 1).expand(-1, 2, 2, 1).contiguous()
    decoded[1, 0, 0] = 0.0
    divisor = torch.where(decoded != 0, decoded, torch.ones_like(decoded))
    reference = qtensor._first_smallest(qtensor._stacked_errors(blocks, decoded, divisor, None, fmt))
    choice = mse_kernel.first_smallest(blocks, decoded, None, -8, 7)
    assert torch.equal(qtensor._settle_undecided(choice), reference)
    monkeypatch.setattr(mse_kernel, "_run", lambda *args: args[-1].fill(-1))  # all left to torch's sums
    choice = mse_kernel.first_smallest(blocks, decoded, None, -8, 7)
    expected = eager_values(blocks, decoded, divisor, None, fmt.element_codec).reshape(4, -1, 32)
    assert torch.equal(choice.squared_errors(0, 4).view(torch.int32), expected.contiguous().view(torch.int32))
    assert torch.equal(qtensor._settle_undecided(choice), reference)


def test_near_ties_are_left_to_torchs_sums():
    """Two candidates whose sums differ by less than the bound: the kernel must not choose. Block of
    one value 1.0 and 127 zeros: ratio 1.0 stores it exactly (error 0); a two-candidate table where
    the second candidate has the same error (0) with another step is a tie the bound cannot break."""
    block = np.zeros((1, 128), np.float32)
    block[0, 0] = 1.0
    steps = np.array([[0.125], [0.0625]], np.float32)  # (candidates, blocks): 1.0 is 8 or 16 steps, error 0
    best = np.empty(1, np.int64)
    _mse_numba.search(block, steps, np.zeros_like(steps), -32.0, 31.0, best)
    assert best[0] == -1
    steps = np.array([[0.125], [0.125]], np.float32)  # the same candidate twice: the first, decided
    _mse_numba.search(block, steps, np.zeros_like(steps), -32.0, 31.0, best)
    assert best[0] == 0


needs_team = pytest.mark.skipif(mse_kernel._find_team() is None,
                                reason="torch runs on no GNU-compatible OpenMP runtime here (not Linux)")


@needs_team
@pytest.mark.parametrize("spec", ["int4:g32:mse", "int4:g32:asym:mse"])
@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize(("rows", "cols"), [(161, 1024), (65, 32)])  # last chunks of 32 blocks, of 1
def test_torchs_openmp_team_answers_every_block_once_as_one_thread_does(threads, spec, rows, cols):
    """The kernel run as a parallel region of torch's OpenMP team (shared symmetric zero points, per-block
    asymmetric ones; block counts that leave a short last chunk): the same answer as one thread, block
    for block. The job's claim counter ends at (chunks + team size) x chunk: every chunk was claimed
    once, and each of the ``threads`` threads ran the region and found nothing left (so the team really
    had that many; unless the OpenMP environment may shrink teams)."""
    fmt, blocks, decoded, divisor, zp = candidates(weights(rows, cols, 17), spec)
    codec = fmt.element_codec
    count, n = decoded.shape[0], blocks.shape[-1]
    flat = blocks.reshape(-1, n).contiguous().numpy()
    zps = np.zeros((count, 1), np.float32) if zp is None else zp.reshape(count, -1).numpy()
    arrays = (decoded.reshape(count, -1).numpy(), zps)
    code_range = (float(codec.min_value), float(codec.max_finite))
    alone, together = np.empty(flat.shape[0], np.int64), np.full(flat.shape[0], -7, np.int64)
    _mse_numba.search(flat, *arrays, *code_range, alone)
    job, _code = mse_kernel._team_job(flat, arrays, code_range, together)
    mse_kernel._find_team()(_mse_numba.team_search.address, job.ctypes.data, threads, 0)
    assert np.array_equal(alone, together)
    chunk = _mse_numba.TEAM_CHUNK_BLOCKS
    if not {"OMP_DYNAMIC", "OMP_THREAD_LIMIT"} & set(os.environ):
        assert job[0] == (-(-flat.shape[0] // chunk) + threads) * chunk


@needs_team
def test_the_quantizer_takes_torchs_team_at_several_threads_with_the_same_codes(monkeypatch):
    """At 2 torch threads each chunk of rows enters one parallel region of 2 threads; at 1, none."""
    monkeypatch.setenv("DTYPELAB_MSE_KERNEL", "always")
    regions, real = [], mse_kernel._find_team()
    monkeypatch.setitem(mse_kernel._state, "team", lambda *args: regions.append(args[2]) or real(*args))
    w, fmt = weights(96, 1024, 9), get_format("int4:g32:asym:mse")
    saved = torch.get_num_threads()
    try:
        for threads in (2, 1):
            torch.set_num_threads(threads)
            assert_same_storage(quantize_tensor(w, fmt), reference_quantize(w, fmt))
    finally:
        torch.set_num_threads(saved)
    assert regions and set(regions) == {2}


def test_an_array_the_team_cannot_read_stays_on_one_thread():
    """The job holds raw addresses: a strided or non-float32 array must not reach it, and shapes that do
    not agree are refused before any address is read."""
    blocks = np.zeros((256, 32), np.float32)
    steps = np.ones((21, 256), np.float32)
    zps, best = np.zeros((21, 1), np.float32), np.empty(256, np.int64)
    assert mse_kernel._team_job(blocks, (steps, zps), (-8.0, 7.0), best) is not None
    assert mse_kernel._team_job(blocks[:, ::2], (steps, zps), (-8.0, 7.0), best) is None
    assert mse_kernel._team_job(blocks, (steps.astype(np.float64), zps), (-8.0, 7.0), best) is None
    assert mse_kernel._team_job(blocks, (steps[:, ::2], zps), (-8.0, 7.0), best) is None
    for bad in ((steps[:, :128].copy(), zps), (steps, np.zeros((21, 7), np.float32)),
                (steps, np.zeros((20, 1), np.float32))):
        with pytest.raises(ValueError, match="do not agree"):
            mse_kernel._team_job(blocks, bad, (-8.0, 7.0), best)
    with pytest.raises(ValueError, match="do not agree"):
        mse_kernel._team_job(blocks, (steps, zps), (-8.0, 7.0), best[:255])


@needs_team
def test_a_forked_child_leaves_the_parents_team(monkeypatch):
    """GNU OpenMP's workers do not survive a fork: a child entering the parent's team would wait forever
    (torch's own parallel operations hang there too, unless the child sets one thread). The fork hook
    makes the child's kernel run on its own thread; the parent keeps its team."""
    monkeypatch.setitem(mse_kernel._state, "team", None)
    assert mse_kernel._team() is not None
    child = multiprocessing.get_context("fork").Process(target=_exit_with_team_state)
    child.start()
    child.join(timeout=60)
    assert child.exitcode == 0 and mse_kernel._team() is not None


def _exit_with_team_state():
    os._exit(0 if mse_kernel._team() is None else 1)


def test_auto_mode_loads_the_kernel_only_once_the_eager_search_has_paid_for_it(monkeypatch):
    monkeypatch.delenv("DTYPELAB_MSE_KERNEL", raising=False)
    monkeypatch.setitem(mse_kernel._state, "module", None)
    monkeypatch.setitem(mse_kernel._state, "eager_elements", 0)
    monkeypatch.setattr(mse_kernel, "LOAD_AFTER_ELEMENTS", 3 * 64 * 256)
    fmt, blocks, decoded, divisor, zp = candidates(weights(64, 256, 10), "int4:g128:mse")
    args = (blocks, decoded, zp, -8, 7)
    assert [mse_kernel.first_smallest(*args) is None for _ in range(4)] == [True, True, True, False]


def test_never_and_other_devices_search_eagerly(monkeypatch):
    fmt, blocks, decoded, divisor, zp = candidates(weights(8, 256, 11), "int4:g128:mse")
    monkeypatch.setenv("DTYPELAB_MSE_KERNEL", "always")
    assert mse_kernel.first_smallest(blocks.to("meta"), decoded, zp, -8, 7) is None
    monkeypatch.setenv("DTYPELAB_MSE_KERNEL", "never")
    assert mse_kernel.first_smallest(blocks, decoded, zp, -8, 7) is None


def test_a_bad_mode_or_a_missing_numba_is_one_clear_error(monkeypatch):
    fmt, blocks, decoded, divisor, zp = candidates(weights(8, 256, 12), "int4:g128:mse")
    monkeypatch.setenv("DTYPELAB_MSE_KERNEL", "fast")
    with pytest.raises(SettingError, match="auto, always, never"):
        mse_kernel.first_smallest(blocks, decoded, zp, -8, 7)
    monkeypatch.setenv("DTYPELAB_MSE_KERNEL", "always")
    monkeypatch.setattr(mse_kernel, "available", lambda: False)
    with pytest.raises(SettingError, match=r"pip install 'dtypelab\[fast\]'"):
        mse_kernel.first_smallest(blocks, decoded, zp, -8, 7)


def test_a_kernel_that_cannot_load_leaves_the_eager_search(monkeypatch):
    """numba installed but its module failing to load (a numpy it does not take, no cache folder): auto
    searches eagerly with the same codes; always says why, in one line."""
    fmt, blocks, decoded, divisor, zp = candidates(weights(8, 256, 15), "int4:g128:mse")
    monkeypatch.setitem(mse_kernel._state, "module", None)
    monkeypatch.setitem(sys.modules, "dtypelab.quant._mse_numba", None)  # makes the import fail
    monkeypatch.delattr(dtypelab.quant, "_mse_numba")
    monkeypatch.setenv("DTYPELAB_MSE_KERNEL", "always")
    with pytest.raises(SettingError, match="could not be loaded"):
        mse_kernel.first_smallest(blocks, decoded, zp, -8, 7)
    monkeypatch.setenv("DTYPELAB_MSE_KERNEL", "auto")
    monkeypatch.setitem(mse_kernel._state, "eager_elements", mse_kernel.LOAD_AFTER_ELEMENTS)
    assert mse_kernel.first_smallest(blocks, decoded, zp, -8, 7) is None
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
