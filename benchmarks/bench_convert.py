"""Checkpoint conversion to bf16 against ``cp`` of the same folder and the script users usually write.

The usual script is ``safetensors.torch.load_file`` -> ``.to(torch.bfloat16)`` -> ``save_file``, shard
by shard. Every method runs in its own process under ``/usr/bin/time``, which reports its peak resident memory
(``ru_maxrss``, file-backed pages included; a child forked straight from this process would inherit
this process's own high-water mark instead).
Cold runs first evict the checkpoint from the page cache (``posix_fadvise(DONTNEED)``); warm runs
follow an untimed warm-up. The checkpoint (fp32, two shards) is generated once under ``.bench/``.
dtypelab's bytecode is compiled first, as pip compiles an installed package (this checkout's
environment sets ``PYTHONDONTWRITEBYTECODE``, which would make each run compile its modules again:
~0.4 s here, which no user of an installed dtypelab pays).
"""

from __future__ import annotations

import compileall
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_file

from dtypelab.report import Table

from .harness import print_table

ROOT = Path(__file__).resolve().parents[1]
BENCH_DIR = ROOT / ".bench" / "convert"
TENSOR_SHAPE = (4096, 4096)  # 64 MiB of fp32, a 7B model's attention projection
PY = sys.executable

INSPECT_SCRIPT = """
import resource, sys, time
from dtypelab.checkpoint import inspect_checkpoint
inspect_checkpoint(sys.argv[1])  # warm: imports and the headers' pages
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
info = inspect_checkpoint(sys.argv[1])
seconds = time.perf_counter() - start
print(seconds, (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024, info.stored_bytes)
"""

USUAL_SCRIPT = """
import pathlib, sys, torch
from safetensors.torch import load_file, save_file
src, dst = map(pathlib.Path, sys.argv[1:3])
dst.mkdir()
for shard in sorted(src.glob("*.safetensors")):
    save_file({k: v.to(torch.bfloat16) for k, v in load_file(shard).items()}, dst / shard.name,
              metadata={"format": "pt"})
"""


def make_checkpoint(gib: int) -> Path:
    """An fp32 checkpoint of ``gib`` GiB in two shards with an index (reused when already there)."""
    folder = BENCH_DIR / f"fp32-{gib}gib"
    if is_built(folder):
        return folder
    per_shard = gib * 2**30 // 2 // (TENSOR_SHAPE[0] * TENSOR_SHAPE[1] * 4)
    torch.manual_seed(0)
    write_two_shards(folder, lambda shard: {f"layers.{(shard - 1) * per_shard + i}.weight":
                                            torch.randn(TENSOR_SHAPE) * 0.02 for i in range(per_shard)})
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "torch_dtype": "float32"}))
    (folder / "done").write_text("")
    return folder


def is_built(folder: Path) -> bool:
    """Whether a generated checkpoint is complete (its ``done`` marker); else ``folder`` is left empty."""
    if (folder / "done").exists():
        return True
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    return False


def write_two_shards(folder: Path, shard_tensors: Callable[[int], dict[str, torch.Tensor]]) -> None:
    """``model-0000N-of-00002.safetensors`` for N = 1, 2 (each built only when written) and the index."""
    weight_map, total = {}, 0
    for shard in (1, 2):
        name, tensors = f"model-{shard:05d}-of-00002.safetensors", shard_tensors(shard)
        save_file(tensors, folder / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, name))
        total += sum(t.nbytes for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))


def commands(src: Path, dst: Path) -> dict[str, list[str]]:
    return {
        "cp -r (floor)": ["cp", "-r", str(src), str(dst)],
        "python -c 'import torch' (start-up)": [PY, "-c", "import torch"],
        "usual script (load_file/.to/save_file)": [PY, "-c", USUAL_SCRIPT, str(src), str(dst)],
        "dtypelab convert": [PY, "-c", "from dtypelab.cli import entry; entry()", "convert", str(src),
                             "--to", "bf16", "-o", str(dst), "--quiet"],
    }


def evict(folder: Path) -> None:
    """Drop the folder's files from the page cache, so the next read comes from disk."""
    for path in folder.iterdir():
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def run_once(command: list[str], src: Path, dst: Path, cold: bool) -> dict[str, float]:
    """Wall seconds, CPU seconds (user + system) and peak RSS bytes of one run, in a fresh process."""
    shutil.rmtree(dst, ignore_errors=True)
    os.sync()  # the previous run's writeback must not slow this one
    if cold:
        evict(src)
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    stats_file = BENCH_DIR / "time_stats"
    stats_file.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    subprocess.run(["/usr/bin/time", "-f", "%M %U %S", "-o", str(stats_file), *command], env=env, check=True)
    seconds = time.perf_counter() - start
    peak_kib, user, system = stats_file.read_text().split()[-3:]
    return {"s": seconds, "cpu_s": float(user) + float(system), "peak_bytes": int(peak_kib) * 1024}


def measure(methods: dict[str, list[str]], src: Path, dst: Path, warm_repeat: int = 5) -> dict:
    """Every method cold (twice) then warm (``warm_repeat`` times after a warm-up), taking turns so
    that load from other processes falls on all methods alike: medians of each, and every round's runs
    (``rounds``: kind -> list of runs, in round order) for the per-round ratios."""
    runs: dict[str, dict[str, list]] = {label: {"cold": [], "warm": []} for label in methods}
    for kind, repeat in (("cold", 2), ("warm-up", 1), ("warm", warm_repeat)):
        for _ in range(repeat):
            for label, command in methods.items():
                result = run_once(command, src, dst, cold=kind == "cold")
                runs[label].setdefault(kind, []).append(result)
    return {label: {"cold_s": statistics.median(r["s"] for r in got["cold"]),
                    "warm_s": statistics.median(r["s"] for r in got["warm"]),
                    "warm_cpu_s": statistics.median(r["cpu_s"] for r in got["warm"]),
                    "peak_bytes": max(r["peak_bytes"] for kind in got.values() for r in kind),
                    "rounds": got}
            for label, got in runs.items()}


def round_ratios(ours: dict, theirs: dict, kind: str, key: str = "s") -> list[float]:
    """Our run over theirs in each round of ``kind`` (the two ran next to each other)."""
    return [a[key] / b[key] for a, b in zip(ours["rounds"][kind], theirs["rounds"][kind], strict=True)]


def spread(ratios: list[float]) -> str:
    """``median (min-max)`` of per-round ratios."""
    return f"{statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f})"


def run() -> Table:
    compileall.compile_dir(ROOT / "src" / "dtypelab", quiet=1)
    rows, results, load_before = [], {}, os.getloadavg()[0]
    dst = BENCH_DIR / "out"
    for gib in (2, 4):
        src = make_checkpoint(gib)
        size = sum(p.stat().st_size for p in src.glob("*.safetensors"))
        methods = {label: command for label, command in commands(src, dst).items()
                   if gib == 2 or not label.startswith(("cp", "python"))}
        for label, result in measure(methods, src, dst).items():
            results[label, gib] = result
            rows.append([label, gib, result["cold_s"], result["warm_s"], result["warm_cpu_s"],
                         result["warm_s"] / results["cp -r (floor)", 2]["warm_s"] if gib == 2 else "",
                         result["peak_bytes"] / 2**20, result["peak_bytes"] / size])
        shutil.rmtree(dst, ignore_errors=True)
    rows.append(_inspect_row(make_checkpoint(4)))
    return Table("Checkpoint conversion to bf16 (fresh process each run; medians)", COLUMNS, rows,
                 _notes(results, load_before))


COLUMNS = ["method", "GiB fp32", "cold_s", "warm_s", "warm_cpu_s", "warm x cp", "peak RSS MiB",
           "peak RSS x ckpt"]


def _notes(results: dict, load_before: float) -> list[str]:
    """The goals' ratios (issue 16 item 2: <= 1.0x the usual script in wall and CPU at 2 and 4 GiB,
    <= 1.3x of cp + start-up), each per round with its median and min-max."""
    usual_label, ours_label = "usual script (load_file/.to/save_file)", "dtypelab convert"
    floor = [cp["s"] + start["s"] for cp, start in zip(results["cp -r (floor)", 2]["rounds"]["warm"],
                                                      results["python -c 'import torch' (start-up)", 2]
                                                      ["rounds"]["warm"], strict=True)]
    ours_2 = results[ours_label, 2]
    notes = [f"machine: {platform.machine()}, {os.cpu_count()} cores, {_ram_gib():.0f} GiB RAM, "
             f"python {platform.python_version()}, torch {torch.__version__}; load average "
             f"{load_before:.1f} before, {os.getloadavg()[0]:.1f} after (other processes share the cores)"]
    for gib in (2, 4):
        ours, usual = results[ours_label, gib], results[usual_label, gib]
        notes.append(f"{gib} GiB, dtypelab / usual script per round: warm wall "
                     f"{spread(round_ratios(ours, usual, 'warm'))}, warm CPU "
                     f"{spread(round_ratios(ours, usual, 'warm', 'cpu_s'))}, cold wall "
                     f"{spread(round_ratios(ours, usual, 'cold'))} (goal <= 1.0x)")
    notes.append("2 GiB, dtypelab / (cp + start-up) per warm round: "
                 f"{spread([run['s'] / f for run, f in zip(ours_2['rounds']['warm'], floor, strict=True)])} "
                 "(goal <= 1.3x)")
    ratio_ours = results[ours_label, 4]["peak_bytes"] / ours_2["peak_bytes"]
    ratio_usual = results[usual_label, 4]["peak_bytes"] / results[usual_label, 2]["peak_bytes"]
    notes.append(f"peak RSS 4 GiB / 2 GiB: dtypelab {ratio_ours:.2f}x, usual {ratio_usual:.2f}x "
                 "(flat = 1.00x)")
    return notes


def _inspect_row(src: Path) -> list:
    """Headers only: time and memory growth of inspect_checkpoint on the 4 GiB folder, in a fresh process."""
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    done = subprocess.run([PY, "-c", INSPECT_SCRIPT, str(src)], env=env, capture_output=True, text=True,
                          check=True)
    seconds, grown, total = done.stdout.split()
    size = sum(p.stat().st_size for p in src.glob("*.safetensors"))
    return ["inspect_checkpoint (headers only, extra RSS)", round(int(total) / 2**30), "", float(seconds),
            "", "", int(grown) / 2**20, int(grown) / size]


def _ram_gib() -> float:
    with open("/proc/meminfo") as meminfo:
        return int(meminfo.readline().split()[1]) / 2**20


if __name__ == "__main__":
    print_table(run())
