"""The ``:mse`` search of integer formats in one compiled pass per block (numba), choosing exactly what the
eager search chooses.

Why: the eager search (``qtensor._search_stacked``) spends seven float32 passes over every weight per
candidate clip ratio, 21 candidates, each pass a torch kernel that reads and writes its operands; that was
3.2-3.7x optimum-quanto's qint4 on minilm. Compiled, a block's 128 weights stay in registers while each
candidate is divided, rounded, clamped, scaled, subtracted, squared and summed: the whole quantization
1.7x quanto's time at 1 thread (``docs/benchmarks.md``, "The :mse search").

Why the choice is the eager one, bit for bit: the elementwise float32 operations are the eager search's,
in its order (``x / divisor``, ``+ zero point``, round half to even, clamp, ``- zero point``, ``* step``,
``- x``, squared: each an IEEE operation with one rounding, no fused multiply-add), so every squared error
``s_i`` is the same float32 number. Only the sum's order differs (torch's reduction tree, here a
vectorised one), and any order of summing n non-negative terms lands within ``gamma = (n-1) u / (1 - (n-1)
u)`` (u = 2^-24) of their exact sum S, relatively. So torch's sum T and this sum K obey
``K (1 - gamma) / (1 + gamma) <= T <= K (1 + gamma) / (1 - gamma)``. A block is *decided* when the
candidate with the first smallest K has an upper bound below every other candidate's lower bound and
below float32's largest value (so its torch sum has not overflowed to inf): then torch's T orders them
the same, and the eager rule (the first smallest T) picks that candidate. Candidates
with the same step, divisor and zero point compute the same T, so the earliest of them stands for all.
Blocks not decided (near ties, sums past float32's range: 0.07% of minilm's) come back as -1 and the caller
searches them eagerly. ``tests/quant/test_mse_kernel.py`` checks the squared errors bit for bit, the bound
against torch's sums, and the choice against the reference search.

Cost of having it: importing numba and loading the cached machine code takes 0.7-0.8 s once per process
(the first compile, ~2 s, is cached beside this file, or in numba's user cache where that is read-only).
The eager search costs ~21 ns per weight here, so in ``auto`` mode the kernel is loaded only once a
process has searched :data:`LOAD_AFTER_ELEMENTS` weights eagerly, about what loading costs (the
rent-or-buy rule: never more than twice the better choice's cost; a one-off minilm search never pays it,
a 135M model's does after its first third). ``DTYPELAB_MSE_KERNEL``: ``auto`` (default), ``always``,
``never``. numba is the optional ``fast`` extra; without it, and for tensors off the CPU, the eager
search runs, with the same result.
Quant stage: builds on :mod:`dtypelab.formats` (through its caller, :mod:`.qtensor`).
"""

from __future__ import annotations

import importlib.util
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from .. import settings
from ..errors import SettingError, first_line

MODE_VARIABLE = "DTYPELAB_MSE_KERNEL"  # auto, always, never: see dtypelab.settings
LOAD_AFTER_ELEMENTS = 32 << 20  # weights searched eagerly (~0.7 s, what loading costs) before auto loads it
MIN_BLOCKS_PER_THREAD = 4096  # fewer a thread (~3 ms of work): one thread (see _run)

_state = {"eager_elements": 0, "module": None, "pool": None, "pool_size": 0}
_pool_lock = threading.Lock()


def _forget_pool() -> None:
    """In a forked child: the parent's pool threads do not exist there, so a submit would wait forever."""
    global _pool_lock
    _state["pool"], _state["pool_size"], _pool_lock = None, 0, threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool)


def first_smallest(blocks: torch.Tensor, decoded: torch.Tensor, divisor: torch.Tensor,
                   zero_point: torch.Tensor | None, qmin: float, qmax: float) -> torch.Tensor | None:
    """Per block, the index of the candidate the eager search picks, or -1 where the bound cannot decide;
    None when the kernel is not to be used (no numba, not on the CPU, ``never``, or not yet worth
    loading in ``auto`` mode: the caller then searches eagerly).

    ``blocks``: (rows, blocks, n) float32 weights; ``decoded``, ``divisor``: the candidates' float32
    steps (the divisor has 0 replaced by 1), (candidates, rows, blocks, 1); ``zero_point``: the same
    shape as float32, or None (symmetric); ``qmin``, ``qmax``: the integer codec's code range.
    Returns int64, (rows, blocks, 1).
    """
    module = _kernel(blocks)
    if module is None:
        return None
    candidates, n = decoded.shape[0], blocks.shape[-1]
    flat = blocks.reshape(-1, n).contiguous().numpy()
    steps, divisors = (t.reshape(candidates, -1).numpy() for t in (decoded, divisor))
    zero_points = np.zeros((candidates, 1), np.float32) if zero_point is None \
        else zero_point.reshape(candidates, -1).numpy()
    best = torch.empty(flat.shape[0], dtype=torch.int64)
    _run(module, flat, (steps, divisors, zero_points), (float(qmin), float(qmax)), best.numpy())
    return best.reshape(*blocks.shape[:-1], 1)


def available() -> bool:
    """Whether numba is installed (the ``fast`` extra), without importing it."""
    return importlib.util.find_spec("numba") is not None


def _kernel(blocks: torch.Tensor):
    """The compiled module when this call should use it (see the module docstring), else None."""
    mode = _mode()
    if mode == "never" or blocks.device.type != "cpu" or not available():
        return None
    waiting = mode == "auto" and _state["module"] is None and _state["eager_elements"] < LOAD_AFTER_ELEMENTS
    if waiting:  # unlocked: concurrent callers may make the load point approximate, never the result
        _state["eager_elements"] += blocks.numel()
        return None
    if _state["module"] is None:
        _state["module"] = _load(mode)
    return _state["module"] or None


def _load(mode: str):
    """The compiled module, or False (remembered: the eager search serves this process) where numba
    cannot load it, e.g. a numba that does not match this numpy, or no writable cache folder for its
    machine code (numba refuses ``cache=True`` then). ``always`` says why instead."""
    try:
        from . import _mse_numba
    except Exception as exc:  # numba's own failures are of many kinds; none may fail a quantization
        if mode == "always":
            raise SettingError(f"{MODE_VARIABLE}=always asks for the compiled :mse search, but it could not "
                               f"be loaded ({type(exc).__name__}: {first_line(exc)}); set auto") from exc
        return False
    return _mse_numba


def _mode() -> str:
    """``DTYPELAB_MSE_KERNEL`` (:mod:`dtypelab.settings`), and ``always`` only where numba is installed."""
    mode = settings.value(MODE_VARIABLE)
    if mode == "always" and not available():
        raise SettingError(f"{MODE_VARIABLE}=always asks for the compiled :mse search, but numba is not "
                           "installed: pip install 'dtypelab[fast]', or set auto")
    return mode


def _run(module, blocks: np.ndarray, candidates: tuple, code_range: tuple[float, float], best: np.ndarray):
    """The kernel over all blocks, split across torch's intra-op thread count (numba releases the GIL):
    each block's answer depends only on its own row, so the split changes nothing. ``candidates``:
    (steps, divisors, zero points), each (candidates, blocks), or (candidates, 1) zero points.

    Split only where each thread gets :data:`MIN_BLOCKS_PER_THREAD` blocks: right after torch's own
    operations its OpenMP workers still spin for a while on the cores, so a short split gains nothing
    (measured on minilm's weights at 2 threads: the kernel alone 0.064 -> 0.042 s when split, inside
    the quantizer 0.065 s either way)."""
    threads = max(1, min(torch.get_num_threads(), blocks.shape[0] // MIN_BLOCKS_PER_THREAD))
    if threads == 1:
        module.search(blocks, *candidates, *code_range, best)
        return
    bounds = [blocks.shape[0] * i // threads for i in range(threads + 1)]
    with _pool_lock:  # no other thread replaces the pool between taking it and submitting to it
        pool = _pool(threads)
        futures = [pool.submit(module.search, blocks[lo:hi], *_columns(candidates, lo, hi), *code_range,
                               best[lo:hi]) for lo, hi in zip(bounds[:-1], bounds[1:], strict=True)]
    for future in futures:
        future.result()


def _columns(candidates: tuple, lo: int, hi: int) -> tuple:
    """Blocks ``lo`` .. ``hi`` of each (candidates, blocks) array; a shared (candidates, 1) one as it is."""
    return tuple(values if values.shape[1] == 1 else values[:, lo:hi] for values in candidates)


def _pool(threads: int) -> ThreadPoolExecutor:
    """One pool for the process, replaced by a larger one when more threads are asked for (the old one
    finishes what it was given). Called under ``_pool_lock``."""
    if _state["pool_size"] < threads:
        if _state["pool"] is not None:
            _state["pool"].shutdown(wait=False)
        _state["pool"], _state["pool_size"] = ThreadPoolExecutor(threads, "dtypelab-mse"), threads
    return _state["pool"]
