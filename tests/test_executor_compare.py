"""compare over many variants and plan's Pareto sweep (--verify) on the executors: one task per variant or
plan, each worker loads the reference once; the JSON equals the in-process run's.

Truth: the same command in this process at one thread (what every worker pins), so the float32 sums run
in the same order and the numbers are equal to the last bit (measured); no timing is involved.
"""

from __future__ import annotations

import functools
import json

import pytest
import torch

import dtypelab
from dtypelab.analysis import CompareSetup, VariantTask, compare_on
from dtypelab.executor import Executor, InProcess
from dtypelab.models import model_inputs
from helpers import run_cli


def one_thread_json(capsys, *argv) -> dict:
    """``dtypelab ARGV --json`` in this process at one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        code, out, err = run_cli(capsys, *argv, "--json")
    finally:
        torch.set_num_threads(threads)
    assert code == 0, err
    return json.loads(out)


COMPARE = ("compare", "tiny-llama", "--to", "int8,int4:g64,bf16", "--text", "The cat sat on the mat.")


def test_compare_on_two_processes_is_the_in_process_json(capsys):
    compared_in_process = one_thread_json(capsys, *COMPARE)
    code, out, err = run_cli(capsys, *COMPARE, "--workers", "2", "--json")
    assert code == 0, err
    assert json.loads(out) == compared_in_process
    assert [v["name"] for v in compared_in_process["variants"]] == ["int8", "int4:g64", "bf16"]


PLAN = ("plan", "tiny-llama", "--budget", "5:8:1.5bpw", "--formats", "int4:g64,int8", "--verify",
        "--verify-windows", "1", "--windows", "1", "--ctx", "32")


def test_the_pareto_sweep_verified_on_two_processes_is_the_in_process_json(capsys):
    in_process = one_thread_json(capsys, *PLAN)
    code, out, err = run_cli(capsys, *PLAN, "--workers", "2", "--json")
    assert code == 0, err
    parallel = json.loads(out)
    assert parallel == in_process
    assert len(parallel["plans"]) == 3 and all(p["measured"]["damage"] > 0 for p in parallel["plans"])
    assert [u[0] for u in parallel["uniform"]] == ["int4:g64", "int8"]


def test_the_options_are_refused_where_they_do_not_apply(capsys):
    for extra, word in ((("--layers",), "--layers"), (("--time",), "--time")):
        code, _, err = run_cli(capsys, *COMPARE, "--workers", "2", *extra)
        assert code == 2 and word in err and len(err.strip().splitlines()) == 1
    code, _, err = run_cli(capsys, "plan", "tiny-llama", "--budget", "6bpw", "--workers", "2")
    assert code == 2 and "--verify" in err and "--exact" in err


class FailsInt8(Executor):
    """In this process, but the int8 task raises on every try."""

    name = "failing"

    def run(self, setup, work, tasks, on_done=None):
        return InProcess().run(setup, functools.partial(_fail_int8, work), tasks, on_done)


def _fail_int8(work, state, task):
    if task.spec == "int8":
        raise MemoryError("worker out of memory")
    return work(state, task)


def _tiny_llama_state() -> tuple:
    loaded = dtypelab.load("tiny-llama")
    return loaded.model, model_inputs(loaded, texts=["a b c d"]), None


def test_a_failed_task_is_a_failed_row_and_the_others_stay():
    result = compare_on(FailsInt8(), CompareSetup(_tiny_llama_state),
                        [VariantTask("bf16"), VariantTask("int8"), VariantTask("fp16")])
    rows = {v.name: v for v in result.variants}
    assert list(rows) == ["bf16", "int8", "fp16"]
    assert "failed on failing" in rows["int8"].failure and "out of memory" in rows["int8"].failure
    assert rows["bf16"].failure is None and rows["bf16"].metrics.sqnr_db > 20


@pytest.mark.slow
def test_compare_on_a_local_ray_cluster_is_the_in_process_json(capsys):
    pytest.importorskip("ray", reason="Ray is a test extra (pip install 'dtypelab[ray]')")
    compared_in_process = one_thread_json(capsys, *COMPARE)
    code, out, err = run_cli(capsys, *COMPARE, "--ray", "local", "--workers", "2", "--json")
    assert code == 0, err
    assert json.loads(out) == compared_in_process
