"""numba code of :mod:`.mse_kernel` (imported only by it, and only when numba is installed): the
``:mse`` candidates' squared errors of each block and the candidate they prove the eager search picks.
The proof and its bound are in :mod:`.mse_kernel`'s docstring.

Measured and dropped: stopping a candidate's sum as soon as its partial sum proves it beaten (checks
every 32, 64 or 128 elements, each block starting from its neighbour's pick): 0.059-0.076 s against
0.046-0.050 s for plain full sums over minilm, since the short loops vectorise worse than the saved
elements pay. (Loops over ``range(begin, end)`` must index with unsigned integers, or numba's negative-index
wraparound stops them vectorising: 7x slower.)
"""

from __future__ import annotations

import math

import numba
import numpy as np

UNIT_ROUNDOFF = 2.0 ** -24  # float32's u: one rounding moves a value by at most this, relatively
SLACK = 1.01  # on gamma: room for the float64 sum's own error and the bounds' arithmetic (~1e-14)


@numba.njit(cache=True, nogil=True)
def squared_errors(x, step, divisor, zero_point, qmin, qmax, out):
    """``out[i] = ((clamp(rint(x[i] / divisor + zero_point)) - zero_point) * step - x[i]) ** 2``, each
    operation in float32 in this order: the eager search's (``qtensor._candidate_errors``), bit for bit.
    No fastmath here: it would allow fused multiply-adds and reciprocals."""
    for i in range(x.shape[0]):
        q = np.rint(x[i] / divisor + zero_point)
        q = qmin if q < qmin else q
        q = qmax if q > qmax else q
        e = (q - zero_point) * step - x[i]
        out[i] = e * e


@numba.njit(fastmath={"reassoc"}, cache=True, nogil=True)
def exact_sum(values):
    """The sum of float32 ``values`` in float64, in any order (``reassoc`` lets it vectorise): within
    ~n 2^-53 of the exact sum, so torch's float32 sum lies within gamma of it on either side."""
    total = 0.0
    for i in range(values.shape[0]):
        total += np.float64(values[i])
    return total


@numba.njit(cache=True, nogil=True)
def search(blocks, steps, divisors, zero_points, qmin, qmax, best):
    """``best[b]``: the candidate of block ``b`` (a row of ``blocks``, (blocks, n) float32) that the eager
    search picks, or -1 where the bound cannot tell. ``steps``, ``divisors``, ``zero_points``:
    (candidates, blocks) float32 (``zero_points`` may be (candidates, 1): zeros, for symmetric formats)."""
    n = blocks.shape[1]
    gamma = SLACK * (n - 1) * UNIT_ROUNDOFF / (1.0 - (n - 1) * UNIT_ROUNDOFF)
    low, high = np.float32(qmin), np.float32(qmax)
    candidates = steps.shape[0]
    squares = np.empty(n, np.float32)
    sums = np.empty(candidates, np.float64)
    shared_zero = zero_points.shape[1] == 1
    for b in range(blocks.shape[0]):
        zb = 0 if shared_zero else b
        first = 0
        for k in range(candidates):
            squared_errors(blocks[b], steps[k, b], divisors[k, b], zero_points[k, zb], low, high, squares)
            sums[k] = exact_sum(squares)
            if sums[k] < sums[first]:
                first = k
        decided = _decided(sums, steps[:, b], divisors[:, b], zero_points[:, zb], first, gamma)
        best[b] = first if decided else -1


@numba.njit(cache=True, nogil=True)
def _decided(sums, steps, divisors, zero_points, first, gamma):
    """Whether every other candidate's smallest possible torch sum exceeds ``first``'s largest one (a
    candidate of the same step, divisor and zero point computes the same sum, and comes later)."""
    if not math.isfinite(sums[first]):
        return False
    ceiling = sums[first] * (1.0 + gamma)
    for k in range(sums.shape[0]):
        if k == first:
            continue
        same = (steps[k] == steps[first] and divisors[k] == divisors[first]
                and zero_points[k] == zero_points[first])
        if not same and not sums[k] * (1.0 - gamma) > ceiling:
            return False
    return True
