"""``convert`` with one task per output shard on the executors (``--workers N``, ``--ray``): the same bytes
as the in-process conversion, complete-or-absent when a shard fails or its worker is killed, ``--strict``
decided over the whole conversion.

Truth: the in-process conversion of the same folder (itself tested against torch's casts and
safetensors' reader in test_convert.py), compared file by file, byte for byte.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from dtypelab.checkpoint import convert_checkpoint
from dtypelab.errors import CheckpointError, DamageError, InputError
from dtypelab.executor import Executor, InProcess, LocalProcesses, RayExecutor
from dtypelab.report import to_jsonable
from helpers import corrupt_tensor_writes, run_cli


def digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def comparable(result) -> dict:
    """The result's JSON without what names the run's own folder."""
    return {k: v for k, v in to_jsonable(result.json_body()).items() if k != "destination"}


def only_the_output(parent: Path, *names: str) -> None:
    """Nothing but ``names`` beside the output: no staging folder was left behind."""
    assert sorted(p.name for p in parent.iterdir()) == sorted(names)


@pytest.fixture(scope="module")
def in_process(sharded_llama_folder, tmp_path_factory):
    """The in-process conversions every executor must equal: (folder, result) per format."""
    out = tmp_path_factory.mktemp("in-process")
    return {fmt: (out / fmt, convert_checkpoint(sharded_llama_folder, out / fmt, fmt))
            for fmt in ("bf16", "int4:g128")}


def test_the_fixture_has_shards_enough_and_quantizes(in_process):
    folder, result = in_process["int4:g128"]
    assert len(result.shards) >= 4 and sum(t.action == "quantized" for t in result.tensors) >= 4


def test_two_processes_write_the_bytes_of_the_in_process_conversion(sharded_llama_folder, tmp_path,
                                                                     in_process):
    events = []
    for fmt, (folder, result) in in_process.items():
        parallel = convert_checkpoint(sharded_llama_folder, tmp_path / fmt, fmt, executor=LocalProcesses(2),
                                      progress=events.append, verify=True)
        assert digest(tmp_path / fmt) == digest(folder), fmt
        assert comparable(parallel) == {**comparable(result), "verified": True}, fmt
    only_the_output(tmp_path, "bf16", "int4:g128")
    last = events[-1]
    assert last.stage == "convert" and last.done == last.total and last.detail.endswith(".safetensors")


class Sabotaged(Executor):
    """In this process, task by task, but ``sabotage(work, state, task)`` runs each task."""

    name = "sabotaged"

    def __init__(self, sabotage, base: Executor | None = None):
        self.sabotage, self.base = sabotage, base or _Sequential()
        self.workers = self.base.workers

    def run(self, setup, work, tasks, on_done=None):
        return self.base.run(setup, functools.partial(self.sabotage, work), tasks, on_done)


class _Sequential(Executor):
    """InProcess's loop, but not an InProcess: convert takes the per-shard task path."""

    run = InProcess.run


TRIES: dict[int, int] = {}


def _fails_shard_one(work, state, task):
    TRIES[task] = TRIES.get(task, 0) + 1
    if task == 1:
        raise OSError(28, "No space left on device")
    return work(state, task)


def _fails_after_writing_once(work, state, task):
    """Shard 1's first try writes its file whole, then fails: the retry must start over."""
    TRIES[task] = TRIES.get(task, 0) + 1
    result = work(state, task)
    if task == 1 and TRIES[task] == 1:
        raise RuntimeError("lost the connection after writing")
    return result


def _killed_on_shard_one(work, state, task):
    if task == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    return work(state, task)


def test_a_shard_that_fails_twice_fails_the_conversion_naming_it(sharded_llama_folder, tmp_path,
                                                                 in_process):
    TRIES.clear()
    with pytest.raises(CheckpointError) as error:
        convert_checkpoint(sharded_llama_folder, tmp_path / "out", "bf16",
                           executor=Sabotaged(_fails_shard_one))
    shard = in_process["bf16"][1].shards[1]
    message = str(error.value)
    assert shard in message and "No space left" in message and "nothing was written" in message
    assert "\n" not in message and ".dtypelab-tmp-" not in message
    assert TRIES[1] == 2  # retried once
    only_the_output(tmp_path)


def test_a_retried_shard_starts_over_and_the_bytes_are_the_same(sharded_llama_folder, tmp_path, in_process):
    TRIES.clear()
    convert_checkpoint(sharded_llama_folder, tmp_path / "out", "bf16",
                       executor=Sabotaged(_fails_after_writing_once))
    assert TRIES[1] == 2 and digest(tmp_path / "out") == digest(in_process["bf16"][0])


def test_a_killed_worker_leaves_no_destination(sharded_llama_folder, tmp_path):
    executor = Sabotaged(_killed_on_shard_one, LocalProcesses(2))
    with pytest.raises(CheckpointError, match="worker process died"):
        convert_checkpoint(sharded_llama_folder, tmp_path / "out", "bf16", executor=executor)
    only_the_output(tmp_path)


def two_shard_folder(folder: Path) -> Path:
    """Two shards and an index; the second shard's tensor overflows float16 (1e6 > 65504)."""
    folder.mkdir()
    torch.manual_seed(0)
    shards = {"a-1.safetensors": {"a": torch.randn(64, 64)},
              "a-2.safetensors": {"b": torch.randn(64, 64) * 1e6, "c": torch.randn(8)}}
    for name, tensors in shards.items():
        save_file(tensors, folder / name)
    weight_map = {tensor: name for name, tensors in shards.items() for tensor in tensors}
    index = {"metadata": {}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return folder


def test_strict_is_decided_over_the_whole_conversion(tmp_path):
    source = two_shard_folder(tmp_path / "src")
    refusals = []
    for name, executor in (("in", None), ("parallel", LocalProcesses(2))):  # the limits pickled to workers
        with pytest.raises(DamageError) as error:
            convert_checkpoint(source, tmp_path / name, "fp16", strict=True, executor=executor)
        refusals.append((str(error.value), comparable(error.value.result)))
    assert refusals[0] == refusals[1] and "'b'" in refusals[0][0]
    only_the_output(tmp_path, "src")


def test_a_shard_error_of_dtypelab_keeps_its_message_and_class(tmp_path, monkeypatch):
    """A bad input found in a worker is the same one-line error the in-process run gives."""
    source = two_shard_folder(tmp_path / "src")

    def refuse(work, state, task):
        raise InputError(f"tensor in shard {task}: cannot be cast: keep it with --keep")

    with pytest.raises(InputError, match="cannot be cast: keep it"):
        convert_checkpoint(source, tmp_path / "out", "bf16", executor=Sabotaged(refuse))
    only_the_output(tmp_path, "src")


def test_cli_workers_equals_the_in_process_output(capsys, sharded_llama_folder, tmp_path, in_process):
    code, out, err = run_cli(capsys, "convert", sharded_llama_folder, "--to", "bf16", "-o", tmp_path / "out",
                             "--workers", "2", "--quiet")
    assert code == 0, err
    assert digest(tmp_path / "out") == digest(in_process["bf16"][0])


def test_cli_refuses_workers_where_they_do_not_apply(capsys, sharded_llama_folder, tmp_path):
    code, _, err = run_cli(capsys, "convert", sharded_llama_folder, "--to", "int4:g64:gptq", "-o",
                           tmp_path / "out", "--workers", "2")
    assert code == 2 and "--workers" in err and len(err.strip().splitlines()) == 1
    code, _, err = run_cli(capsys, "convert", sharded_llama_folder, "--to", "bf16", "-o", tmp_path / "out",
                           "--workers", "0")
    assert code == 2 and "at least 1" in err
    only_the_output(tmp_path)


def loopback_only() -> list[str]:
    """The addresses this process's descendants (Ray's GCS, raylet, workers) listen on, other than the
    loopback ones."""
    import psutil

    found = []
    for child in psutil.Process().children(recursive=True):
        try:
            connections = child.net_connections(kind="inet")
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        found += [f"{child.name()} {c.laddr.ip}:{c.laddr.port}" for c in connections
                  if c.status == psutil.CONN_LISTEN and c.laddr.ip not in ("127.0.0.1", "::ffff:127.0.0.1")]
    return found


@pytest.mark.slow
def test_a_local_ray_cluster_writes_the_same_bytes_on_loopback_only(sharded_llama_folder, tmp_path,
                                                                    in_process, capfd):
    """Ray started by the run itself on 127.0.0.1 with 2 CPUs and shut down after; while it runs, every
    process of it listens on loopback only, and every actor reports the node 127.0.0.1."""
    ray = pytest.importorskip("ray", reason="Ray is a test extra (pip install 'dtypelab[ray]')")
    capfd.readouterr()
    exposed: list[str] = []
    for fmt, (folder, result) in in_process.items():
        executor = RayExecutor("local", 2)
        parallel = convert_checkpoint(sharded_llama_folder, tmp_path / fmt, fmt, executor=executor,
                                      progress=lambda event: exposed.extend(loopback_only()))
        assert digest(tmp_path / fmt) == digest(folder), fmt
        assert comparable(parallel) == comparable(result), fmt
        assert executor.node_addresses == {"127.0.0.1"} and not ray.is_initialized()
    assert exposed == []
    # Ray's start-up notice is one line at most, per cluster started
    assert len([line for line in capfd.readouterr().err.splitlines() if line.strip()]) <= 2
    code = main_exit_code("convert", sharded_llama_folder, "--to", "bf16", "-o", tmp_path / "quiet",
                          "--ray", "local", "--workers", "2", "--quiet")
    assert code == 0 and capfd.readouterr().err == ""  # --quiet: not even that line
    assert digest(tmp_path / "quiet") == digest(in_process["bf16"][0])
    only_the_output(tmp_path, "bf16", "int4:g128", "quiet")


def main_exit_code(*argv) -> int:
    from dtypelab.cli import main

    try:
        main([str(arg) for arg in argv])
    except SystemExit as exit_info:
        return exit_info.code or 0
    return 0


def test_verify_runs_in_the_worker_of_each_shard_and_catches_bytes_that_differ(tmp_path, monkeypatch):
    """The task path (an executor running in this process, so the corruption reaches it): every shard is
    checked by the worker that wrote it, and a bit flipped on the way out fails the conversion."""
    import dtypelab.checkpoint.writer as writer

    source = two_shard_folder(tmp_path / "src")
    checked = []
    real_verify = writer.verify_output
    monkeypatch.setattr(writer, "verify_output", lambda plan, *rest: (checked.append(
        [s.file for s in plan.shards]), real_verify(plan, *rest))[1])
    result = convert_checkpoint(source, tmp_path / "ok", "bf16", verify=True, executor=_Sequential())
    assert checked == [["a-1.safetensors"], ["a-2.safetensors"]] and result.verified
    corrupt_tensor_writes(monkeypatch)
    with pytest.raises(CheckpointError, match="verification failed") as caught:
        convert_checkpoint(source, tmp_path / "out", "bf16", verify=True, executor=_Sequential())
    assert ".dtypelab-tmp-" not in str(caught.value)
    only_the_output(tmp_path, "src", "ok")
