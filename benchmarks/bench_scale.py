"""Scale-out on this machine: the same command in-process, on ``--workers 2`` and on a local Ray cluster
of 2 CPUs (``--ray local --workers 2``), wall time and peak memory.

Two workloads, each method a fresh ``dtypelab`` process, the methods taking turns round by round (so a
load change falls on all of them alike) after one untimed warm-up round:

* ``sensitivity smollm2 --method exact``: the exact sweep only (one forward per layer group with only
  that group quantized), kept small: ``--to int8``, one window of 64 tokens, layers 0 and 3-9 (the
  others ``--exclude``\\ d): 32 group tasks.
* ``convert --to bf16`` of a synthetic 2 GiB fp32 checkpoint in 4 shards of 512 MiB (built once under
  ``.bench/scale``, as bench_convert builds its own), warm page cache: 4 shard tasks.

Peak memory is the sum over every process of the run's tree (the driver, its worker processes; for Ray
also its GCS, raylet and worker processes) of that process's largest resident set size, sampled every
50 ms with psutil: shared pages (torch's libraries, the page cache a read maps) count once per process,
so the sum is an upper bound of what the tree held at once. Every method's output is checked equal to
the in-process one (the sweep's scores, the converted files' bytes).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import torch
from safetensors.torch import save_file

from dtypelab.report import Table

from .harness import print_table

ROOT = Path(__file__).resolve().parents[1]
BENCH_DIR = ROOT / ".bench" / "scale"
PY = sys.executable
CLI = [PY, "-c", "from dtypelab.cli import entry; entry()"]
SHARDS, SHARD_TENSORS, TENSOR_SHAPE = 4, 8, (4096, 4096)  # 8 x 64 MiB fp32 per shard: 2 GiB in all
SWEEP = ["sensitivity", "smollm2", "--to", "int8", "--method", "exact", "--windows", "1", "--ctx", "64",
         "--exclude", "model.layers.1*", "--exclude", "model.layers.2*", "--json"]
METHODS = {"in-process": [], "--workers 2": ["--workers", "2"],
           "ray, 2 CPUs": ["--ray", "local", "--workers", "2"]}
SAMPLE_SECONDS = 0.05


def run() -> Table:
    load_before = os.getloadavg()
    checkpoint = make_checkpoint()
    dst = BENCH_DIR / "out"
    workloads = {
        "sensitivity --method exact (32 tasks)": (lambda extra: [*CLI, *SWEEP, *extra], _sweep_scores, 3),
        "convert 2 GiB -> bf16 (4 shards)": (
            lambda extra: [*CLI, "convert", str(checkpoint), "--to", "bf16", "-o", str(dst), "--quiet",
                           *extra], lambda out: _digest(dst), 3),
    }
    rows = []
    for label, (command, outcome, rounds) in workloads.items():
        runs = take_turns({name: lambda extra=extra, command=command, outcome=outcome:
                           measured(command(extra), dst, outcome) for name, extra in METHODS.items()}, rounds)
        rows += _rows(label, runs)
    load_after = os.getloadavg()
    notes = [f"load average (1, 5, 15 min) before {_load(load_before)}, after {_load(load_after)}; "
             f"{os.cpu_count()} cores, shared with other work",
             "wall: median (min-max) over the rounds; ratio: to in-process in the same round",
             "peak memory: the sum of each process's largest RSS over the run's process tree (driver, "
             "workers, Ray's own processes), sampled every 50 ms; shared pages count once per process",
             "ray includes starting and stopping its local cluster; --workers includes spawning the "
             "workers, each of which loads the model (sweep) or opens the shards (convert) itself"]
    columns = ["workload", "method", "wall_s", "wall_min_max_s", "ratio_to_in_process", "peak_memory_mib",
               "processes", "same_output"]
    return Table("Scale-out on this machine: in-process vs --workers 2 vs Ray (2 CPUs)", columns, rows, notes)


def take_turns(methods: dict, rounds: int) -> dict[str, list[dict]]:
    """Each method once per round, in turns, after one untimed warm-up round."""
    runs: dict[str, list[dict]] = {name: [] for name in methods}
    for index in range(rounds + 1):
        for name, method in methods.items():
            result = method()
            if index:
                runs[name].append(result)
    return runs


def measured(command: list[str], dst: Path, outcome) -> dict:
    """Wall seconds, summed peak RSS (bytes) and process count of one run, and ``outcome(stdout)``
    (what its output must equal), taken before the next run replaces the output."""
    shutil.rmtree(dst, ignore_errors=True)
    os.sync()  # the previous run's writeback must not slow this one
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "NO_PROGRESS": "1"}
    start = time.perf_counter()
    child = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    peaks: dict[int, int] = {}
    sampler = threading.Thread(target=_sample, args=(child, peaks), daemon=True)
    sampler.start()
    stdout, stderr = child.communicate()
    seconds = time.perf_counter() - start
    sampler.join()
    if child.returncode:
        last = (stderr.decode(errors="replace").strip().splitlines() or [""])[-1]
        raise RuntimeError(f"{' '.join(command[3:])} exited {child.returncode}: {last}")
    return {"s": seconds, "peak_bytes": sum(peaks.values()), "processes": len(peaks),
            "outcome": outcome(stdout)}


def _sample(child: subprocess.Popen, peaks: dict[int, int]) -> None:
    """Every process of ``child``'s tree: its largest RSS seen, until ``child`` ends."""
    try:
        root = psutil.Process(child.pid)
    except psutil.NoSuchProcess:
        return
    while child.poll() is None:
        try:
            tree = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            break
        for process in tree:
            try:
                peaks[process.pid] = max(peaks.get(process.pid, 0), process.memory_info().rss)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        time.sleep(SAMPLE_SECONDS)


def _rows(label: str, runs: dict[str, list[dict]]) -> list[list]:
    base = runs["in-process"]
    rows = []
    for name, got in runs.items():
        seconds = [r["s"] for r in got]
        ratios = [r["s"] / b["s"] for r, b in zip(got, base, strict=True)]
        rows.append([label, name, round(statistics.median(seconds), 1),
                     f"{min(seconds):.1f}-{max(seconds):.1f}",
                     f"{statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f})",
                     round(max(r["peak_bytes"] for r in got) / 2**20),
                     max(r["processes"] for r in got),
                     all(r["outcome"] == b["outcome"] for r, b in zip(got, base, strict=True))])
    return rows


def _sweep_scores(stdout: bytes) -> list:
    """The sweep's measured damages (the JSON's scores, timings aside)."""
    return [(s["group"], s["fmt"], s["exact"]) for s in json.loads(stdout)["scores"]]


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def _load(load: tuple[float, float, float]) -> str:
    return ", ".join(f"{x:.2f}" for x in load)


def make_checkpoint() -> Path:
    """The fp32 checkpoint, :data:`SHARDS` shards and an index (reused when already complete)."""
    folder = BENCH_DIR / "fp32-2gib-4shards"
    if (folder / "done").exists():
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    torch.manual_seed(0)
    weight_map = {}
    for shard in range(SHARDS):
        name = f"model-{shard + 1:05d}-of-{SHARDS:05d}.safetensors"
        tensors = {f"layers.{shard * SHARD_TENSORS + i}.weight": torch.randn(TENSOR_SHAPE) * 0.02
                   for i in range(SHARD_TENSORS)}
        save_file(tensors, folder / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, name))
    total = SHARDS * SHARD_TENSORS * TENSOR_SHAPE[0] * TENSOR_SHAPE[1] * 4
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                     "weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "torch_dtype": "float32"}))
    (folder / "done").write_text("")
    return folder


if __name__ == "__main__":
    print_table(run())
