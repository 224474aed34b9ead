"""numba code of :mod:`.mse_kernel` (imported only by it, and only when numba is installed): the
``:mse`` candidates' squared errors of each block and the candidate they prove the eager search picks,
on one thread (:func:`search`) or on every thread of torch's OpenMP team (:data:`team_search`). The proof
and its bound are in :mod:`.mse_kernel`'s docstring.

Measured and dropped: stopping a candidate's sum as soon as its partial sum proves it beaten (checks
every 32, 64 or 128 elements): 0.059-0.076 s against 0.046-0.050 s for full sums over minilm, since the
short loops vectorise worse than the saved elements pay. (Loops over ``range(begin, end)`` must index
with unsigned integers, or numba's negative-index wraparound stops them vectorising: 7x slower.)
"""

from __future__ import annotations

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

UNIT_ROUNDOFF = 2.0 ** -24  # float32's u: one rounding moves a value by at most this, relatively
FLOAT32_MAX = 3.4028234663852886e38  # a torch sum above this is inf, which no bound of ours covers
SLACK = 1.01  # on gamma: room for the float64 sum's own error and the bounds' arithmetic (~1e-14)
TEAM_CHUNK_BLOCKS = 64  # blocks a team thread claims at a time: ~40 us of work, one atomic add
JOB_FIELDS = ("next_block", "blocks", "n", "candidates", "zero_point_columns",  # int64 each, in this order
              "blocks_at", "steps_at", "zero_points_at", "best_at", "code_range_at")
JOB_LENGTH = len(JOB_FIELDS)


@numba.njit(cache=True, nogil=True, inline="always")
def squared_error(x, step, divisor, zero_point, qmin, qmax):
    """``((clamp(rint(x / divisor + zero_point)) - zero_point) * step - x) ** 2``, each operation in
    float32 in this order: the eager search's (``qtensor._candidate_errors``), bit for bit. No fastmath
    here: it would allow fused multiply-adds and reciprocals."""
    q = np.rint(x / divisor + zero_point)
    q = qmin if q < qmin else q
    q = qmax if q > qmax else q
    e = (q - zero_point) * step - x
    return e * e


@numba.njit(cache=True, nogil=True, inline="always")
def squared_error_symmetric(x, step, divisor, qmin, qmax):
    """:func:`squared_error` at zero point 0, without its add and subtract, the same float32 number:
    ``+ 0`` only turns a -0.0 quotient into +0.0, so the code is the same value up to the sign of a
    zero, ``e`` is ``-x`` or a signed zero either way, and its square is the same bits. 5% of the
    kernel's time on minilm."""
    q = np.rint(x / divisor)
    q = qmin if q < qmin else q
    q = qmax if q > qmax else q
    e = q * step - x
    return e * e


@numba.njit(cache=True, nogil=True, inline="always")
def _divisor(step):
    """What a candidate's values are divided by: its step, or 1 for a zero step (``qtensor._scaled``)."""
    return step if step != 0 else np.float32(1)


@numba.njit(cache=True, nogil=True)
def squared_errors(x, step, divisor, zero_point, qmin, qmax, out):
    """:func:`squared_error` of every element of ``x`` into ``out`` (a loop LLVM vectorises)."""
    for i in range(x.shape[0]):
        out[i] = squared_error(x[i], step, divisor, zero_point, qmin, qmax)


@numba.njit(cache=True, nogil=True)
def squared_errors_symmetric(x, step, divisor, qmin, qmax, out):
    """:func:`squared_error_symmetric` of every element of ``x`` into ``out``."""
    for i in range(x.shape[0]):
        out[i] = squared_error_symmetric(x[i], step, divisor, qmin, qmax)


@numba.njit(fastmath={"reassoc"}, cache=True, nogil=True)
def exact_sum(values):
    """The sum of float32 ``values`` in float64, in any order (``reassoc`` lets it vectorise): within
    ~n 2^-53 of the exact sum, so torch's float32 sum lies within gamma of it on either side. (A float32
    sum here saves ~5% of the kernel but doubles the blocks left undecided: 55 -> 112 of minilm's 84k.)"""
    total = 0.0
    for i in range(values.shape[0]):
        total += np.float64(values[i])
    return total


@numba.njit(cache=True, nogil=True)
def upper(value, gamma):
    """The largest torch sum of the terms whose exact sum (to ~1e-14) is ``value``."""
    return value * (1.0 + gamma)


@numba.njit(cache=True, nogil=True)
def lower(value, gamma):
    """The smallest torch sum of the terms whose exact sum (to ~1e-14) is ``value``."""
    return value * (1.0 - gamma)


@numba.njit(cache=True, nogil=True)
def search(blocks, steps, zero_points, qmin, qmax, best):
    """``best[b]``: the candidate of block ``b`` (a row of ``blocks``, (blocks, n) float32) that the eager
    search picks, or -1 where the bound cannot tell. ``steps``, ``zero_points``: (candidates, blocks)
    float32 (a zero step divides by 1) (``zero_points`` may be (candidates, 1), shared by all blocks: zeros,
    for symmetric formats). Where every zero point is 0, the errors skip it
    (:func:`squared_error_symmetric`, the same bits).

    A block starts from the previous block's pick (neighbours are alike, so the best's bound is tight
    early). A candidate is skipped, its sum recorded as +inf, where the squared errors of the block's
    smallest and largest values alone (two of the terms torch sums: :func:`_floors`) already exceed the
    best's upper bound: 8% off int4:g128's kernel time on minilm, 25% off int4:g32:asym's, measured with
    the floors computed block by block; computed for all blocks in one vectorised pass per candidate
    instead, the search over minilm's weights went from 0.054-0.057 to 0.048-0.052 s (in-process
    timers, one thread)."""
    n, candidates, count = blocks.shape[1], steps.shape[0], blocks.shape[0]
    if (n - 1) * UNIT_ROUNDOFF >= 0.5:  # blocks of 2^23+ values: the bound means nothing, torch decides
        best[:] = -1
        return
    gamma = SLACK * (n - 1) * UNIT_ROUNDOFF / (1.0 - (n - 1) * UNIT_ROUNDOFF)
    low, high = np.float32(qmin), np.float32(qmax)
    squares = np.empty(n, np.float32)
    sums = np.empty(candidates, np.float64)
    shared_zero = zero_points.shape[1] == 1
    zero = not zero_points.any()  # every zero point 0 (symmetric formats; possible for asymmetric ones)
    floors = _floors(blocks, steps, zero_points, low, high)  # (candidates, blocks)
    first = 0
    for b in range(count):
        x, zb = blocks[b], 0 if shared_zero else b
        start, first, ceiling = first, -1, np.inf
        for j in range(candidates):
            k = start + j if start + j < candidates else start + j - candidates
            if lower(floors[k, b], gamma) > ceiling:  # torch's sum >= these two terms: beaten already
                sums[k] = np.inf
                continue
            step, zero_point = steps[k, b], zero_points[k, zb]
            divisor = _divisor(step)
            if zero:
                squared_errors_symmetric(x, step, divisor, low, high, squares)
            else:
                squared_errors(x, step, divisor, zero_point, low, high, squares)
            sums[k] = exact_sum(squares)
            if first < 0 or sums[k] < sums[first] or (sums[k] == sums[first] and k < first):
                first, ceiling = k, upper(sums[k], gamma)
        decided = _decided(sums, steps[:, b], zero_points[:, zb], first, gamma)
        best[b] = first if decided else -1


@numba.njit(cache=True, nogil=True)
def _floors(blocks, steps, zero_points, low, high):
    """(candidates, blocks) float64: each candidate's squared errors of each block's smallest and largest
    value (one term where they are equal), torch's own terms (:func:`squared_error`), so a lower bound
    on its sum. One loop over the blocks per candidate, which LLVM vectorises."""
    count, candidates = blocks.shape[0], steps.shape[0]
    smallest, largest = np.empty(count, np.float32), np.empty(count, np.float32)
    for b in range(count):
        smallest[b], largest[b] = _extremes(blocks[b])
    floors = np.empty((candidates, count), np.float64)
    zero_columns = np.empty(count, np.float32)
    for k in range(candidates):
        if zero_points.shape[1] == 1:  # shared: one value for every block
            zero_columns[:] = zero_points[k, 0]
        else:
            zero_columns[:] = zero_points[k]
        _candidate_floors(smallest, largest, steps[k], zero_columns, low, high, floors[k])
    return floors


@numba.njit(cache=True, nogil=True)
def _candidate_floors(smallest, largest, steps, zero_points, low, high, out):
    """One candidate's :func:`_floors` over every block (each argument one value a block)."""
    for b in range(out.shape[0]):
        step = steps[b]
        divisor = _divisor(step)
        low_term = np.float64(squared_error(smallest[b], step, divisor, zero_points[b], low, high))
        high_term = np.float64(squared_error(largest[b], step, divisor, zero_points[b], low, high))
        out[b] = low_term + high_term if largest[b] != smallest[b] else low_term


@numba.njit(cache=True, nogil=True)
def undecided_squares(blocks, steps, zero_points, qmin, qmax, undecided, out):
    """``out[k, j]``: the squared errors of candidate ``k`` on block ``undecided[j]`` (the same arrays as
    :func:`search`; ``out`` (candidates, len(undecided), n) float32): the eager search's terms, bit for
    bit, for torch to sum in its own order where the bound could not decide."""
    low, high = np.float32(qmin), np.float32(qmax)
    shared_zero = zero_points.shape[1] == 1
    for j in range(undecided.shape[0]):
        b = undecided[j]
        zb = 0 if shared_zero else b
        for k in range(steps.shape[0]):
            step = steps[k, b]
            divisor = _divisor(step)
            squared_errors(blocks[b], step, divisor, zero_points[k, zb], low, high, out[k, j])


@numba.njit(cache=True, nogil=True)
def _extremes(x):
    """The smallest and the largest value of ``x``."""
    smallest, largest = x[0], x[0]
    for i in range(1, x.shape[0]):
        smallest = x[i] if x[i] < smallest else smallest
        largest = x[i] if x[i] > largest else largest
    return smallest, largest


@numba.njit(cache=True, nogil=True)
def _decided(sums, steps, zero_points, first, gamma):
    """Whether every other candidate's smallest possible torch sum exceeds ``first``'s largest one (a
    candidate of the same step and zero point computes the same sum, and comes later), and that
    largest one is a finite float32: finite squares can still add up past float32's range (weights near
    1e19 under float32 scales), where torch's sums are inf for several candidates and the eager rule keeps
    the first of them."""
    ceiling = upper(sums[first], gamma)
    if not ceiling < FLOAT32_MAX:  # torch's float32 sum may have overflowed to inf (or a sum is NaN/inf)
        return False
    for k in range(sums.shape[0]):
        if k == first:
            continue
        same = steps[k] == steps[first] and zero_points[k] == zero_points[first]
        if not same and not lower(sums[k], gamma) > ceiling:
            return False
    return True


# numba.cfunc compiles at its definition, so the intrinsics it calls come first.

@intrinsic
def _fetch_add(typingctx, pointer, value):
    """``*pointer += value`` as one atomic operation; returns the value before."""
    def codegen(context, builder, signature, args):
        return builder.atomic_rmw("add", args[0], args[1], "seq_cst")
    return types.int64(types.CPointer(types.int64), types.int64), codegen


@intrinsic
def _int64_pointer(typingctx, address):
    """A ``void *`` as an ``int64 *`` (the job's fields)."""
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(64).as_pointer())
    return types.CPointer(types.int64)(types.voidptr), codegen


@intrinsic
def _address_as(typingctx, address, dtype):
    """An int64 address (a job field) as a pointer to ``dtype``'s items, for ``numba.carray``."""
    item = dtype.dtype

    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], context.get_value_type(item).as_pointer())
    return types.CPointer(item)(types.int64, dtype), codegen


@numba.cfunc(types.void(types.voidptr), cache=True, nogil=True)
def team_search(job_address):
    """:func:`search` as the body of an OpenMP parallel region (``GOMP_parallel(team_search.address, job,
    threads, 0)``: every thread of the team runs this). ``job``: int64 fields in :data:`JOB_FIELDS`' order,
    the ``*_at`` ones addresses of C-contiguous arrays (float32 blocks (blocks, n), steps (candidates,
    blocks), zero points (candidates, zero_point_columns); int64 best (blocks); float64
    code range (qmin, qmax)). Threads claim :data:`TEAM_CHUNK_BLOCKS` blocks at a time by an atomic add on
    ``next_block`` until none are left, so a team of any size (one thread included) answers every block
    once, and a thread the machine runs slower simply claims fewer. Each block's choice depends only on
    its own row, so the split never changes it; whether a block is left undecided can, at the bound's
    ~1e-14 edge (a chunk starts from candidate 0, so other candidates may be skipped), and those blocks
    are settled exactly by torch's sums either way."""
    job = numba.carray(_int64_pointer(job_address), JOB_LENGTH)
    count, n, candidates, zero_columns = job[1], job[2], job[3], job[4]
    blocks = numba.carray(_address_as(job[5], np.float32), (count, n))
    steps = numba.carray(_address_as(job[6], np.float32), (candidates, count))
    zero_points = numba.carray(_address_as(job[7], np.float32), (candidates, zero_columns))
    best = numba.carray(_address_as(job[8], np.int64), count)
    code_range = numba.carray(_address_as(job[9], np.float64), 2)
    while True:
        lo = _fetch_add(_int64_pointer(job_address), TEAM_CHUNK_BLOCKS)
        if lo >= count:
            return
        hi = min(lo + TEAM_CHUNK_BLOCKS, count)
        zps = zero_points if zero_columns == 1 else zero_points[:, lo:hi]
        search(blocks[lo:hi], steps[:, lo:hi], zps, code_range[0], code_range[1], best[lo:hi])
