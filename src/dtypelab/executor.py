"""The executor seam: independent tasks run in this process, in local worker processes, or on Ray.

Base layer: imports only :mod:`dtypelab.errors` (Ray lazily, where it is asked for). The lab's sweeps are
embarrassingly parallel — a sensitivity ``--exact`` sweep is layer groups x formats independent
forwards, a conversion is independent output shards — and one small interface runs them three ways with
the same results:

* :class:`InProcess` (the default): today's loop.
* :class:`LocalProcesses` (``--workers N``): the standard library's process pool, spawned fresh.
* :class:`RayExecutor` (``--ray auto`` / ``--ray ADDRESS``): one actor per worker on a Ray cluster.

A run is ``setup`` (a picklable callable, run **once per worker**: it loads the model, cuts the inputs) and
``work(state, task)`` per task; results come back in task order, and ``on_done(index, result)`` hears of
each one in the driver as it finishes (progress). A task that raises is retried once, then becomes a
:class:`TaskFailure` with its reason; so does a task whose worker died (killed, out of memory) or whose
worker's setup failed: the other tasks' results are never lost. Every worker pins torch to ``threads``
intra-op threads, so a task computes what it would in-process with that many threads (results are equal
to the in-process run up to float32 summation order when thread counts differ).

``--ray local`` starts a one-machine cluster whose every process listens on 127.0.0.1 only (Ray would
otherwise resolve 127.0.0.1 to the machine's routable address and listen on all interfaces; see
:func:`_loopback_only`), and shuts it down after the run.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from .errors import DtypelabError, InputError

RAY_INSTALL = "pip install 'dtypelab[ray]'"

OnDone = Callable[[int, Any], None]
"""``on_done(index, result)``: told in the driver, as each task finishes (in any order)."""


@dataclass(frozen=True)
class TaskFailure:
    """A task that failed twice (or whose worker died): which one and why — a row with its reason, never
    a lost run. ``error``: the exception itself when it was one of dtypelab's own (a bad input found in the
    worker), so a caller can raise it again with its exit code."""

    task: Any
    reason: str
    error: DtypelabError | None = None


class Executor:
    """Runs ``work(state, task)`` for every task, ``state = setup()`` once per worker."""

    name = "in-process"
    workers = 1

    def run(self, setup: Callable[[], Any], work: Callable[[Any, Any], Any], tasks: Sequence[Any],
            on_done: OnDone | None = None) -> list[Any]:  # pragma: no cover - every executor overrides it
        raise NotImplementedError

    def describe(self) -> str:
        return f"{self.name}, {self.workers} worker(s)"


class InProcess(Executor):
    """The tasks one after another in this process: ``setup`` once, then each task (retried once)."""

    def run(self, setup, work, tasks, on_done=None):
        state, results = setup(), []
        for index, task in enumerate(tasks):
            results.append(_attempt(work, state, task))
            _tell(on_done, index, results[-1])
        return results


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

    def run(self, setup, work, tasks, on_done=None):
        import concurrent.futures
        import multiprocessing

        context = multiprocessing.get_context("spawn")
        pool = concurrent.futures.ProcessPoolExecutor(self.workers, mp_context=context, initializer=_start,
                                                      initargs=(setup, self.threads))
        results: list[Any] = [None] * len(tasks)
        try:
            futures = {pool.submit(_in_worker, work, task): index for index, task in enumerate(tasks)}
            for future in concurrent.futures.as_completed(futures):
                index = futures[future]
                results[index] = _outcome(future, tasks[index])
                _tell(on_done, index, results[index])
        finally:  # on an error (a cancelled progress), no new task starts; the running ones end first
            pool.shutdown(wait=True, cancel_futures=True)
        return results


@dataclass
class RayExecutor(Executor):
    """One Ray actor per worker (the model loaded once per actor; each actor takes the next task as it
    finishes one); ``address`` ``"auto"`` joins a running cluster, ``"local"`` starts one on this machine,
    on 127.0.0.1 only, with ``workers`` CPUs, and shuts it down after the run.

    ``node_addresses``: after a run, the IP address of every node an actor ran on (``{"127.0.0.1"}`` for
    a local cluster). ``notices``: let Ray's one start-up line (its token-authentication notice) reach
    stderr; False (``--quiet``) keeps it back too, unless starting failed."""

    address: str = "local"
    workers: int = 2
    threads: int = 1
    notices: bool = True
    name = "ray"
    node_addresses: set[str] = field(default_factory=set)

    def run(self, setup, work, tasks, on_done=None):
        ray = _import_ray()
        with _cluster(ray, self.address, self.workers * self.threads, self.notices):
            actor = ray.remote(num_cpus=self.threads)(_RayWorker)  # the CPUs its pinned threads use
            actors = [actor.remote(setup, self.threads) for _ in range(min(self.workers, len(tasks)))]
            try:
                return _dispatch(ray, actors, work, tasks, on_done, self.node_addresses)
            finally:
                for handle in actors:  # a joined cluster keeps running: our actors leave it
                    with contextlib.suppress(Exception):  # an actor that died already
                        ray.kill(handle)


class _RayWorker:
    """A Ray actor: its own state from ``setup`` (or the reason setup failed), then tasks."""

    def __init__(self, setup: Callable[[], Any], threads: int) -> None:
        self.state, self.setup_failure = _set_up(setup, threads)

    def call(self, work: Callable[[Any, Any], Any], task: Any) -> Any:
        if self.setup_failure is not None:
            return TaskFailure(task, self.setup_failure)
        return _attempt(work, self.state, task)

    def node(self) -> str:
        import ray

        return ray.util.get_node_ip_address()


def _dispatch(ray, actors: list, work: Callable, tasks: Sequence[Any], on_done: OnDone | None,
              nodes: set[str]) -> list[Any]:
    """Each actor takes the next task when it is done with one; a dead actor's task is a failure and the
    others go on; results in task order."""
    results: list[Any] = [None] * len(tasks)
    queue, in_flight = list(range(len(tasks)))[::-1], {}
    probes = {actor.node.remote(): actor for actor in actors}
    live = list(actors)
    for actor in live:
        if queue:
            index = queue.pop()
            in_flight[actor.call.remote(work, tasks[index])] = (index, actor)
    while in_flight:
        [ref], _ = ray.wait(list(in_flight), num_returns=1)
        index, actor = in_flight.pop(ref)
        try:
            results[index] = ray.get(ref)
        except ray.exceptions.RayError as exc:  # the actor died (killed, out of memory): not retried there
            results[index] = TaskFailure(tasks[index], f"its Ray worker died: {_one_line(exc, last=True)}")
            live.remove(actor)
            actor = None
        _tell(on_done, index, results[index])
        if actor is not None and queue:
            index = queue.pop()
            in_flight[actor.call.remote(work, tasks[index])] = (index, actor)
        if not live and queue:
            for index in queue[::-1]:
                results[index] = TaskFailure(tasks[index], "no Ray worker left (every one died)")
                _tell(on_done, index, results[index])
            queue.clear()
    for probe, actor in probes.items():
        if actor in live:
            with contextlib.suppress(ray.exceptions.RayError):
                nodes.add(ray.get(probe))
    return results


@contextlib.contextmanager
def _cluster(ray, address: str, workers: int, notices: bool = True) -> Iterator[None]:
    """Ray connected for the run: a cluster started here (``"local"``) is shut down after it, one that was
    joined (``"auto"``, an address) or already connected is left running."""
    if ray.is_initialized():
        yield
        return
    try:
        with _quiet_start(1 if notices else 0), _loopback_only(address == "local"):
            if address == "local":
                ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False,
                         _node_ip_address="127.0.0.1", configure_logging=False)
            else:
                ray.init(address=address, log_to_driver=False, configure_logging=False)
    except (ConnectionError, RuntimeError, ValueError) as exc:  # no cluster there, a bad address
        raise InputError(_no_cluster(address, exc)) from None
    try:
        yield
    finally:
        ray.shutdown()


def _no_cluster(address: str, exc: Exception) -> str:
    """The one line for a Ray cluster that could not be started or joined."""
    if address == "local":
        return (f"--ray local: Ray could not start a cluster on this machine ({_one_line(exc)}): run "
                "without --ray, or with --workers N alone")
    return (f"--ray {address}: no Ray cluster to join ({_one_line(exc)}): start one with `ray start --head` "
            "(and `ray start --address HEAD:6379` on the other nodes), or use --ray local on this machine")


LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
"""Ray's switch for a single-machine cluster: set to 0, its node address is the loopback one and every
process it starts listens on 127.0.0.1 (measured with ``ss -ltnp``: without it, on all interfaces)."""


@contextlib.contextmanager
def _loopback_only(local: bool) -> Iterator[None]:
    """For a local cluster: Ray's processes started meanwhile inherit :data:`LOOPBACK_ENV` = 0, and the
    driver (Ray read the variable when first imported) is told the same."""
    if not local:
        yield
        return
    from ray._private import ray_constants

    saved_env, saved_flag = os.environ.get(LOOPBACK_ENV), ray_constants.ENABLE_RAY_CLUSTER
    os.environ[LOOPBACK_ENV], ray_constants.ENABLE_RAY_CLUSTER = "0", False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved_flag
        if saved_env is None:
            os.environ.pop(LOOPBACK_ENV, None)
        else:
            os.environ[LOOPBACK_ENV] = saved_env


@contextlib.contextmanager
def _quiet_start(lines_shown: int = 1) -> Iterator[None]:
    """Ray's start-up writes to the process's stderr (file descriptor 2, below Python): keep it, and
    let through only its first ``lines_shown`` lines (the token-authentication notice), or everything when
    start-up failed, so the reason is not lost."""
    import sys
    import tempfile

    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        failed = True
        try:
            yield
            failed = False
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            lines = captured.read().decode(errors="replace").splitlines()
            shown = lines if failed else [line for line in lines if line.strip()][:lines_shown]
            if shown:
                sys.stderr.write("\n".join(shown) + "\n")
                sys.stderr.flush()


def executor_for(workers: int | None = None, ray: str | None = None, quiet: bool = False,
                 threads: int = 1) -> Executor:
    """The executor a command's ``--workers N`` / ``--ray ADDRESS`` ask for (in-process without them):
    Ray with ``workers`` actors (default: this machine's CPUs), else ``workers`` local processes, each
    worker pinned to ``threads`` torch threads (``--worker-threads``; a Ray actor asks for as many CPUs,
    so one actor per node can use the node's cores). ``quiet`` (``--quiet``): not even Ray's one start-up
    line.

    Raises:
        InputError: a worker or thread count below 1, ``--worker-threads`` without workers, or ``--ray``
            without Ray installed.
    """
    if workers is not None and workers < 1:
        raise InputError(f"--workers {workers}: give at least 1")
    if threads < 1:
        raise InputError(f"--worker-threads {threads}: give at least 1")
    if threads != 1 and workers is None and ray is None:
        raise InputError(f"--worker-threads {threads} sets each worker's torch threads: add --workers N or "
                         "--ray, or drop it (in this process torch uses its own thread count)")
    if ray is not None:
        _import_ray()
        return RayExecutor(ray, workers or os.cpu_count() or 1, threads=threads, notices=not quiet)
    return LocalProcesses(workers, threads) if workers and workers > 1 else InProcess()


def _import_ray():
    try:
        import ray
    except ImportError:
        raise InputError(f"--ray needs Ray, which is not installed: {RAY_INSTALL}") from None
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    return ray


_STATE: dict[str, Any] = {}


def _start(setup: Callable[[], Any], threads: int) -> None:
    """A local worker process's start: pinned threads, then its state (or why setup failed)."""
    _STATE["state"], _STATE["failure"] = _set_up(setup, threads)


def _in_worker(work: Callable[[Any, Any], Any], task: Any) -> Any:
    if _STATE["failure"] is not None:
        return TaskFailure(task, _STATE["failure"])
    return _attempt(work, _STATE["state"], task)


def _set_up(setup: Callable[[], Any], threads: int) -> tuple[Any, str | None]:
    """(state, None), or (None, the reason) when setup raised: every task of that worker then fails with
    the reason, instead of a pool that breaks and says nothing."""
    _pin_threads(threads)
    try:
        return setup(), None
    except Exception as exc:  # noqa: BLE001 - reported on each of the worker's tasks
        return None, f"worker setup failed: {type(exc).__name__}: {_one_line(exc)}"


def _outcome(future, task: Any) -> Any:
    """A local future's result; a worker that died (killed, out of memory) fails its tasks, with why."""
    from concurrent.futures.process import BrokenProcessPool

    try:
        return future.result()
    except BrokenProcessPool:
        return TaskFailure(task, "its worker process died (killed, or out of memory)")
    except Exception as exc:  # noqa: BLE001 - a result that could not come back (unpicklable, ...)
        return TaskFailure(task, f"{type(exc).__name__}: {_one_line(exc)}")


def _tell(on_done: OnDone | None, index: int, result: Any) -> None:
    if on_done is not None:
        on_done(index, result)


def _one_line(exc: BaseException, last: bool = False) -> str:
    """An exception's message on one line: its first non-empty line, or its ``last`` (Ray's errors end
    with the cause, after a traceback)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return (lines[-1] if last else lines[0]) if lines else type(exc).__name__


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
        own = exc if isinstance(exc, DtypelabError) else None
        return TaskFailure(task, f"{type(exc).__name__}: {_one_line(exc)}", own)
