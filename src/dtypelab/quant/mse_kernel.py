"""The ``:mse`` search of integer formats in one compiled pass per block (numba), choosing exactly what the
eager search chooses.

Why: the eager search (``qtensor._search_stacked``) spends seven float32 passes over every weight per
candidate clip ratio, 21 candidates, each pass a torch kernel that reads and writes its operands; that was
3.2-3.7x optimum-quanto's qint4 on minilm. Compiled, a block's 128 weights stay in registers while each
candidate is divided, rounded, clamped, scaled, subtracted, squared and summed: the whole quantization
1.3-2.0x quanto's time at 1 and 2 threads in most runs (``docs/benchmarks.md``, "The :mse search").

Why the choice is the eager one, bit for bit: the elementwise float32 operations are the eager search's,
in its order (``x / divisor``, ``+ zero point``, round half to even, clamp, ``- zero point``, ``* step``,
``- x``, squared: each an IEEE operation with one rounding, no fused multiply-add), so every squared error
``s_i`` is the same float32 number. Only the sum's order differs (torch's reduction tree, here a
vectorised one), and any order of summing n non-negative terms lands within ``gamma = (n-1) u / (1 - (n-1)
u)`` (u = 2^-24) of their exact sum S, relatively. So torch's sum T and this sum K obey
``K (1 - gamma) / (1 + gamma) <= T <= K (1 + gamma) / (1 - gamma)``. A block is *decided* when the
candidate with the first smallest K has an upper bound below every other candidate's lower bound and
below float32's largest value (so its torch sum has not overflowed to inf): then torch's T orders them
the same, and the eager rule (the first smallest T) picks that candidate. Candidates with the same step
and zero point (the divisor follows from the step) compute the same T, so the earliest of them stands for
all.
Blocks not decided (near ties, sums past float32's range: 0.07% of minilm's) come back as -1 with their
candidates' squared errors, computed by the kernel (the eager bits), which the caller sums with torch and
decides by the eager rule. On more than one torch thread the kernel runs as a parallel region of torch's
own OpenMP team (:func:`_run`). ``tests/quant/test_mse_kernel.py`` checks the squared errors bit for
bit, the bound against torch's sums, and the choice against the reference search.

Cost of having it: importing numba and loading the cached machine code takes 0.5-0.9 s once per process
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

import ctypes
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .. import settings
from ..errors import SettingError, first_line

MODE_VARIABLE = "DTYPELAB_MSE_KERNEL"  # auto, always, never: see dtypelab.settings
LOAD_AFTER_ELEMENTS = 32 << 20  # weights searched eagerly (~0.7 s, what loading costs) before auto loads it
OPENMP_LIBRARIES = ("libgomp.so.1", "libiomp5.so", "libomp.so")  # in torch/lib, the one torch runs on

_state = {"eager_elements": 0, "module": None, "team": None}


def _leave_team() -> None:
    """In a forked child: the parent's OpenMP workers do not exist there (see :func:`_team`)."""
    _state["team"] = False


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_leave_team)


@dataclass(frozen=True)
class KernelChoice:
    """What the compiled search settles for one call, and what it leaves to torch's float32 sums: the
    undecided blocks' squared errors, computed on request a few blocks at a time (their memory is the
    caller's to bound: 21 x n float32 values a block)."""

    best: torch.Tensor  # int64 (rows, blocks, 1): each block's candidate, -1 where the bound cannot tell
    undecided: torch.Tensor  # int64: the -1 blocks' indices among the (rows * blocks) flattened blocks
    block_elements: int  # n, the values of a block
    _module: object  # the compiled module, and its inputs, for squared_errors
    _inputs: tuple  # (blocks (count, n), steps (candidates, count), zero points, (qmin, qmax))

    def squared_errors(self, start: int, stop: int) -> torch.Tensor:
        """float32 (candidates, stop - start, n): every candidate's squared errors on the undecided blocks
        ``undecided[start:stop]``, the eager search's terms (``qtensor._candidate_errors``) bit for bit."""
        blocks, steps, zero_points, code_range = self._inputs
        which = self.undecided[start:stop].numpy()
        out = np.empty((steps.shape[0], which.shape[0], blocks.shape[1]), np.float32)
        self._module.undecided_squares(blocks, steps, zero_points, *code_range, which, out)
        return torch.from_numpy(out)


def first_smallest(blocks: torch.Tensor, decoded: torch.Tensor, zero_point: torch.Tensor | None,
                   qmin: float, qmax: float) -> KernelChoice | None:
    """Per block, the index of the candidate the eager search picks where the bound decides, and the
    blocks it cannot decide (near ties), whose candidates' squared errors torch then sums; None when the
    kernel is not to be used (no numba, not on the CPU, ``never``, or not yet worth loading in ``auto``
    mode: the caller then searches eagerly).

    ``blocks``: (rows, blocks, n) float32 weights; ``decoded``: the candidates' float32 steps,
    (candidates, rows, blocks, 1) (a zero step divides by 1, as ``qtensor._scaled``); ``zero_point``: the
    same shape as float32, or None (symmetric); ``qmin``, ``qmax``: the integer codec's code range.
    """
    module = _kernel(blocks)
    if module is None:
        return None
    candidates, n = decoded.shape[0], blocks.shape[-1]
    flat = blocks.reshape(-1, n).contiguous().numpy()
    steps = decoded.reshape(candidates, -1).contiguous().numpy()
    zero_points = np.zeros((candidates, 1), np.float32) if zero_point is None \
        else zero_point.reshape(candidates, -1).contiguous().numpy()
    code_range = (float(qmin), float(qmax))
    best = torch.full((flat.shape[0],), -1, dtype=torch.int64)  # a block left unanswered stays undecided
    _run(module, flat, (steps, zero_points), code_range, best.numpy())
    undecided = torch.from_numpy(np.flatnonzero(best.numpy() < 0))
    return KernelChoice(best.reshape(*blocks.shape[:-1], 1), undecided, n, module,
                        (flat, steps, zero_points, code_range))


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
    """The kernel over all blocks: on torch's OpenMP team where there is one to share and torch has more
    than one intra-op thread (:func:`_team`), else on this thread. ``candidates``: (steps, zero points),
    each (candidates, blocks) float32, or (candidates, 1) zero points.

    Why torch's team and not threads of our own: right after torch's operations its OpenMP workers spin
    on the cores for a few milliseconds, waiting for the next parallel region, and a thread of ours
    competes with them. Threads of a Python pool gained nothing inside the quantizer (minilm's weights at
    2 threads: 0.065 s either way); the same kernel as a parallel region of torch's own runtime runs
    where those workers wait, 1.6-1.8x faster from 1152 blocks (one of minilm's 384 x 384 weights) up."""
    threads = torch.get_num_threads()
    split = threads > 1 and blocks.shape[0] > module.TEAM_CHUNK_BLOCKS
    team, job = (_team(), _team_job(blocks, candidates, code_range, best)) if split else (None, None)
    if team is None or job is None:
        module.search(blocks, *candidates, *code_range, best)
        return
    record, _code_range = job  # both held until the region ends: the record has only their addresses
    team(module.team_search.address, record.ctypes.data, threads, 0)  # ctypes releases the GIL meanwhile


def _team_job(blocks: np.ndarray, candidates: tuple, code_range: tuple[float, float],
              best: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """(the int64 job record ``team_search`` reads, ``_mse_numba.JOB_FIELDS``; the float64 code range it
    points to), or None where an array is not of the dtype and C layout read through raw addresses (then
    :func:`_run` stays on one thread). The other arrays are held by :func:`_run`'s caller."""
    steps, zero_points = candidates
    expected = ((blocks, np.float32), (steps, np.float32), (zero_points, np.float32), (best, np.int64))
    if any(array.dtype != dtype or not array.flags.c_contiguous for array, dtype in expected):
        return None
    count = blocks.shape[0]
    shapes_agree = (steps.shape[1] == count and best.shape == (count,) and zero_points.shape[0] ==
                    steps.shape[0] and zero_points.shape[1] in (1, count))
    if not shapes_agree:  # the record's addresses would be read past their arrays' ends
        raise ValueError(f"mse kernel job: blocks {blocks.shape}, steps {steps.shape}, zero points "
                         f"{zero_points.shape}, best {best.shape} do not agree")
    code = np.asarray(code_range, dtype=np.float64)
    job = np.array([0, blocks.shape[0], blocks.shape[1], steps.shape[0], zero_points.shape[1],
                    blocks.ctypes.data, steps.ctypes.data, zero_points.ctypes.data,
                    best.ctypes.data, code.ctypes.data], dtype=np.int64)
    return job, code


def _team():
    """``GOMP_parallel`` of the OpenMP runtime torch uses (a ctypes function: body, data, threads, flags),
    or None where none is found or this is a forked child. Looked up once per process.

    Found as the library of :data:`OPENMP_LIBRARIES` in torch's own ``lib`` folder that is already mapped
    into this process (Linux wheels ship ``libgomp.so.1`` there); LLVM's and Intel's runtimes export the
    same GNU entry point. Elsewhere (macOS, Windows, a build without OpenMP) the kernel runs on one thread.
    A forked child never uses it: GNU OpenMP's workers do not survive a fork (torch's own operations
    hang there too unless ``torch.set_num_threads(1)``)."""
    if _state["team"] is None:
        _state["team"] = _find_team() or False
    return _state["team"] or None


def _find_team():
    """:func:`_team`'s lookup, uncached: the first usable library of :data:`OPENMP_LIBRARIES`."""
    folder = Path(torch.__file__).parent / "lib"
    mapped = _mapped_files()
    for name in OPENMP_LIBRARIES:
        path = folder / name
        if not path.exists() or str(path.resolve()) not in mapped:
            continue
        try:
            function = ctypes.CDLL(str(path)).GOMP_parallel
        except (OSError, AttributeError):
            continue
        function.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint, ctypes.c_uint]
        function.restype = None
        return function
    return None


def _mapped_files() -> set[str]:
    """Paths of the files mapped into this process (``/proc/self/maps``; empty where there is none)."""
    try:
        with open("/proc/self/maps") as maps:
            fields = [line.split(maxsplit=5) for line in maps]
    except OSError:
        return set()
    return {parts[5].strip() for parts in fields if len(parts) == 6}  # address, perms, ..., path
