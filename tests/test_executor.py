"""The executor seam: results in task order, setup once per worker, a failed task retried once then a
row with its reason, and the sensitivity sweep equal in-process, on local processes and on Ray.

Truth: the in-process run (today's loop) and counters the toy tasks keep.
"""

from __future__ import annotations

import functools
import os
import signal
import sys

import pytest
import torch

import dtypelab
from dtypelab.analysis import sensitivity
from dtypelab.errors import InputError
from dtypelab.executor import InProcess, LocalProcesses, RayExecutor, TaskFailure, executor_for
from dtypelab.models import model_inputs
from helpers import run_cli


def _setup() -> dict:
    return {"pid": os.getpid(), "seen": {}}


def _square_or_fail(state: dict, task: int) -> tuple[int, int]:
    """Fails the first try of task 3 and every try of task 5; else (task², the worker's pid)."""
    tries = state["seen"][task] = state["seen"].get(task, 0) + 1
    if task == 5 or (task == 3 and tries == 1):
        raise ValueError(f"task {task} try {tries}")
    return task * task, state["pid"]


@pytest.mark.parametrize("executor", [InProcess(), LocalProcesses(2)], ids=["in-process", "processes"])
def test_results_in_order_retried_once_then_a_failure_row(executor):
    results = executor.run(_setup, _square_or_fail, list(range(8)))
    assert [r[0] for r in results if not isinstance(r, TaskFailure)] == [0, 1, 4, 9, 16, 36, 49]
    failure = results[5]
    assert isinstance(failure, TaskFailure) and failure.task == 5 and "task 5 try 2" in failure.reason
    pids = {r[1] for r in results if not isinstance(r, TaskFailure)}
    assert len(pids) <= executor.workers and (os.getpid() in pids) == isinstance(executor, InProcess)


def _broken_setup() -> dict:
    raise OSError(2, "No such file or directory", "model.safetensors")


@pytest.mark.parametrize("executor", [InProcess(), LocalProcesses(2)], ids=["in-process", "processes"])
def test_on_done_hears_every_task_in_the_driver(executor):
    heard = []
    results = executor.run(_setup, _square_or_fail, list(range(6)),
                           on_done=lambda index, result: heard.append((index, result, os.getpid())))
    assert sorted(index for index, *_ in heard) == list(range(6))
    assert all(results[index] == result and pid == os.getpid() for index, result, pid in heard)


def test_a_worker_whose_setup_fails_fails_each_task_with_the_reason():
    results = LocalProcesses(2).run(_broken_setup, _square_or_fail, [1, 2, 3])
    assert all(isinstance(r, TaskFailure) and "worker setup failed" in r.reason
               and "No such file" in r.reason for r in results)


def _dies_on_task_2(state: dict, task: int) -> int:
    if task == 2:
        os.kill(os.getpid(), signal.SIGKILL)
    return task


def test_a_killed_worker_is_a_failure_row_and_the_results_done_before_stay():
    results = LocalProcesses(1).run(_setup, _dies_on_task_2, [0, 1, 2, 3])
    assert results[:2] == [0, 1]  # one worker, in order: done before it died
    assert all(isinstance(r, TaskFailure) and "died" in r.reason for r in results[2:])


def test_executor_for_reads_the_options():
    assert isinstance(executor_for(), InProcess) and isinstance(executor_for(1), InProcess)
    assert isinstance(executor_for(3), LocalProcesses) and executor_for(3).workers == 3
    with pytest.raises(InputError, match="at least 1"):
        executor_for(0)


def _tiny_llama_state() -> tuple:
    loaded = dtypelab.load("tiny-llama")
    return loaded.model, model_inputs(loaded, text_set="calibration", ctx=64, windows=2), None


@pytest.fixture(scope="module")
def in_process():
    torch.set_num_threads(1)  # what each worker pins: the same sums in the same order
    try:
        model, inputs, _ = _tiny_llama_state()
        return sensitivity(model, "int4:g64,int8", inputs, method="exact")
    finally:
        torch.set_num_threads(os.cpu_count() or 1)


def test_the_sweep_on_local_processes_equals_the_in_process_one(in_process):
    model, inputs, _ = _tiny_llama_state()
    events = []
    parallel = sensitivity(model, "int4:g64,int8", inputs, method="exact", executor=LocalProcesses(2),
                           worker_setup=_tiny_llama_state, progress=lambda e: events.append(e) or True)
    tasks = [e for e in events if e.stage == "sensitivity" and e.unit == "tasks"]
    assert len({e.done for e in tasks}) == tasks[-1].total + 1  # 0 .. every task, one event per task done
    assert tasks[-1].done == tasks[-1].total == len(parallel.scores)
    # one thread everywhere: bit-identical (measured); the tolerance is float32 summation order, were the
    # kernels to block differently
    for ours, theirs in zip(in_process.scores, parallel.scores, strict=True):
        assert theirs.exact == pytest.approx(ours.exact, rel=1e-6) and theirs.problem == ""


@pytest.mark.slow
def test_the_sweep_on_a_local_ray_cluster_equals_the_in_process_one(in_process):
    """Ray started here, on 127.0.0.1 with 2 CPUs, no dashboard, usage stats off; shut down after."""
    ray = pytest.importorskip("ray", reason="Ray is a test extra (pip install 'dtypelab[ray]')")
    from dtypelab.cli.sensitivity import ranking_state  # installed code: what Ray workers can import

    model, inputs, _ = _tiny_llama_state()
    options = {"texts": (), "text_file": None, "input_ids": None, "input_file": None,
               "text_set": "calibration", "ctx": 64, "stride": None, "windows": 2}
    setup = functools.partial(ranking_state, "tiny-llama", False, "cpu", [], None, None, options)
    assert torch.equal(setup()[1]["input_ids"], inputs["input_ids"])  # the workers' inputs are these
    result = sensitivity(model, "int4:g64,int8", inputs, method="exact", executor=RayExecutor("local", 2),
                         worker_setup=setup)
    for ours, theirs in zip(in_process.scores, result.scores, strict=True):
        assert theirs.exact == pytest.approx(ours.exact, rel=1e-6)
    assert not ray.is_initialized()  # the cluster this run started is gone


@pytest.mark.slow
def test_ray_retries_reports_failures_and_a_dead_actor_without_losing_the_rest():
    """A local cluster of 2 actors: task 3 retried, task 5 a failure row, the actor that ran task 2 dies
    (its task a failure row, the other actor takes the rest); every actor on node 127.0.0.1."""
    ray = pytest.importorskip("ray", reason="Ray is a test extra (pip install 'dtypelab[ray]')")
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray's workers cannot import tests/

    def work(state, task):
        return _dies_on_task_2(state, task) if task == 2 else _square_or_fail(state, task)[0]

    executor, heard = RayExecutor("local", 2), []
    results = executor.run(_setup, work, list(range(8)), on_done=lambda index, _: heard.append(index))
    assert [results[i] for i in (0, 1, 3, 4, 6, 7)] == [0, 1, 9, 16, 36, 49]
    assert isinstance(results[5], TaskFailure) and "task 5 try 2" in results[5].reason
    assert isinstance(results[2], TaskFailure) and "died" in results[2].reason
    assert sorted(heard) == list(range(8)) and executor.node_addresses == {"127.0.0.1"}
    assert not ray.is_initialized()


def test_a_parallel_sweep_needs_a_worker_setup(tiny_llama):
    inputs = model_inputs(tiny_llama, texts=["a b c"])
    with pytest.raises(InputError, match="worker_setup"):
        sensitivity(tiny_llama.model, "int8", inputs, method="exact", executor=LocalProcesses(2))


def test_cli_refuses_workers_without_the_exact_sweep_and_ray_without_ray(capsys, monkeypatch):
    code, _, err = run_cli(capsys, "sensitivity", "tiny-llama", "--to", "int8", "--workers", "2")
    assert code == 2 and "--exact" in err
    import builtins

    real_import = builtins.__import__

    def no_ray(name, *args, **kwargs):
        if name == "ray":
            raise ImportError("no ray")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_ray)
    code, _, err = run_cli(capsys, "sensitivity", "tiny-llama", "--to", "int8", "--exact", "--ray", "auto")
    assert code == 2 and "pip install 'dtypelab[ray]'" in err and len(err.strip().splitlines()) == 1


def test_ray_auto_without_a_cluster_is_one_line_naming_ray_start(monkeypatch, tmp_path):
    ray = pytest.importorskip("ray", reason="Ray is a test extra (pip install 'dtypelab[ray]')")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))  # no session of another run to find
    with pytest.raises(InputError) as error:
        RayExecutor("auto", 2).run(_setup, _square_or_fail, [1])
    message = str(error.value)
    assert "ray start --head" in message and "--ray local" in message and "\n" not in message
    assert not ray.is_initialized()


def test_worker_threads_pin_each_worker_and_need_workers():
    executor = executor_for(2, threads=3)
    assert isinstance(executor, LocalProcesses) and executor.threads == 3
    threads = executor.run(_setup, _torch_threads, [0, 1])
    assert threads == [3, 3]  # what each worker process computes with
    with pytest.raises(InputError, match="--worker-threads 2 sets each worker's torch threads"):
        executor_for(threads=2)
    with pytest.raises(InputError, match="--worker-threads 0: give at least 1"):
        executor_for(2, threads=0)


def _torch_threads(state, task) -> int:
    return torch.get_num_threads()


@pytest.mark.parametrize("argv", [["sensitivity", "dummy", "--to", "int8", "--exact"],
                                  ["compare", "dummy", "--to", "int8"]], ids=["sensitivity", "compare"])
def test_the_cli_refuses_worker_threads_without_workers(capsys, argv):
    code, out, err = run_cli(capsys, *argv, "--worker-threads", "2")
    assert code == 2 and out == "" and "--worker-threads 2 sets each worker's torch threads" in err
    assert len(err.strip().splitlines()) == 1
