"""The executor seam: independent tasks run in this process, in local worker processes, or on Ray.

Base layer: imports only :mod:`dtypelab.errors` (Ray lazily, where it is asked for). The lab's sweeps are
embarrassingly parallel — a sensitivity ``--exact`` sweep is layer groups x formats independent forwards —
and one small interface runs them three ways with the same results:

* :class:`InProcess` (the default): today's loop.
* :class:`LocalProcesses` (``--workers N``): the standard library's process pool, spawned fresh.
* :class:`RayExecutor` (``--ray auto`` / ``--ray ADDRESS``): one actor per worker on a Ray cluster.

A run is ``setup`` (a picklable callable, run **once per worker**: it loads the model, cuts the inputs) and
``work(state, task)`` per task; results come back in task order. A task that raises is retried once, then
becomes a :class:`TaskFailure` with its reason: the other tasks' results are never lost. Every worker pins
torch to ``threads`` intra-op threads, so a task computes what it would in-process with that many threads
(results are equal to the in-process run up to float32 summation order when thread counts differ).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from .errors import InputError

RAY_INSTALL = "pip install 'dtypelab[ray]'"


@dataclass(frozen=True)
class TaskFailure:
    """A task that failed twice: which one and why (a row with its reason, never a lost run)."""

    task: Any
    reason: str


class Executor:
    """Runs ``work(state, task)`` for every task, ``state = setup()`` once per worker."""

    name = "in-process"
    workers = 1

    def run(self, setup: Callable[[], Any], work: Callable[[Any, Any], Any],
            tasks: Sequence[Any]) -> list[Any]:  # pragma: no cover - every executor overrides it
        raise NotImplementedError

    def describe(self) -> str:
        return f"{self.name}, {self.workers} worker(s)"


class InProcess(Executor):
    """The tasks one after another in this process: ``setup`` once, then each task (retried once)."""

    def run(self, setup, work, tasks):
        state = setup()
        return [_attempt(work, state, task) for task in tasks]


@dataclass
class LocalProcesses(Executor):
    """``workers`` fresh processes of this machine (spawned: no state inherited), ``threads`` torch threads
    each; ``setup`` runs once per process."""

    workers: int = 2
    threads: int = 1
    name = "local processes"

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise InputError(f"--workers {self.workers}: give at least 1")

    def run(self, setup, work, tasks):
        import concurrent.futures
        import multiprocessing

        context = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(self.workers, mp_context=context, initializer=_start,
                                                    initargs=(setup, self.threads)) as pool:
            futures = [pool.submit(_in_worker, work, task) for task in tasks]
            return [future.result() for future in futures]


@dataclass
class RayExecutor(Executor):
    """One Ray actor per worker (the model loaded once per actor); ``address`` ``"auto"`` joins a running
    cluster, ``"local"`` starts one on this machine bound to 127.0.0.1 with ``workers`` CPUs."""

    address: str = "local"
    workers: int = 2
    threads: int = 1
    name = "ray"

    def run(self, setup, work, tasks):
        ray = _import_ray()
        started = not ray.is_initialized()
        if started and self.address == "local":
            ray.init(num_cpus=self.workers, include_dashboard=False, log_to_driver=False,
                     _node_ip_address="127.0.0.1", configure_logging=False)
        elif started:
            ray.init(address=self.address, log_to_driver=False, configure_logging=False)
        try:
            actor = ray.remote(num_cpus=1)(_RayWorker)
            actors = [actor.remote(setup, self.threads) for _ in range(self.workers)]
            pending = [actors[i % len(actors)].call.remote(work, task) for i, task in enumerate(tasks)]
            return ray.get(pending)  # the inputs travel once per actor (in setup), not per task
        finally:
            if started:  # a cluster this run started ends with it; one the caller joined is left alone
                ray.shutdown()


class _RayWorker:
    """A Ray actor: its own state from ``setup``, then tasks."""

    def __init__(self, setup: Callable[[], Any], threads: int) -> None:
        _pin_threads(threads)
        self.state = setup()

    def call(self, work: Callable[[Any, Any], Any], task: Any) -> Any:
        return _attempt(work, self.state, task)


def executor_for(workers: int | None = None, ray: str | None = None) -> Executor:
    """The executor a command's ``--workers N`` / ``--ray ADDRESS`` ask for (in-process without them):
    Ray with ``workers`` actors (default: this machine's CPUs), else ``workers`` local processes.

    Raises:
        InputError: a worker count below 1, or ``--ray`` without Ray installed.
    """
    if workers is not None and workers < 1:
        raise InputError(f"--workers {workers}: give at least 1")
    if ray is not None:
        _import_ray()
        return RayExecutor(ray, workers or os.cpu_count() or 1)
    return LocalProcesses(workers) if workers and workers > 1 else InProcess()


def _import_ray():
    try:
        import ray
    except ImportError:
        raise InputError(f"--ray needs Ray, which is not installed: {RAY_INSTALL}") from None
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    return ray


_STATE: dict[str, Any] = {}


def _start(setup: Callable[[], Any], threads: int) -> None:
    """A local worker process's start: pinned threads, then its state."""
    _pin_threads(threads)
    _STATE["state"] = setup()


def _in_worker(work: Callable[[Any, Any], Any], task: Any) -> Any:
    return _attempt(work, _STATE["state"], task)


def _pin_threads(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def _attempt(work: Callable[[Any, Any], Any], state: Any, task: Any) -> Any:
    """``work(state, task)``, retried once; a second failure is a :class:`TaskFailure`."""
    try:
        return work(state, task)
    except Exception:  # noqa: BLE001 - a task that fails once gets a second try
        pass
    try:
        return work(state, task)
    except Exception as exc:  # noqa: BLE001 - any task failure becomes a row with its reason
        return TaskFailure(task, f"{type(exc).__name__}: {exc}")
