"""Start-up (issue 16 item 1): what ``dtypelab --help`` and friends cost in a fresh process.

Every command runs in its own process, the commands taking turns within a round (so load from other
processes falls on all alike), 7 rounds after a warm-up round. The floor is Python's own start-up
(``python -c pass``); the reference points are ``import torch`` (what every command paid before) and
the ``hf`` CLI's ``--help`` (huggingface_hub, the CLI dtypelab's house style follows).

dtypelab runs as an installed package would: its bytecode compiled first (``compileall``; pip
compiles what it installs, and this checkout's environment sets ``PYTHONDONTWRITEBYTECODE``, which
would otherwise make every run compile every module it imports again). One row runs ``--help``
from a copy of dtypelab without bytecode (the standard library's and the packages' bytecode as usual),
to show what compiling dtypelab's own modules costs.
"""

from __future__ import annotations

import compileall
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from dtypelab.report import Table

from .harness import print_table

ROOT = Path(__file__).resolve().parents[1]
ROUNDS = 7
GOAL_S = 0.3  # issue 16 item 1: dtypelab --help here
BIN = Path(sys.executable).parent
COLUMNS = ["command", "median_s", "min-max s", "x python", "x import torch"]


def commands() -> dict[str, list[str]]:
    dtypelab = [sys.executable, "-m", "dtypelab.cli"]
    found = {"python -c pass (floor)": [sys.executable, "-c", "pass"],
             "python -c 'import torch'": [sys.executable, "-c", "import torch"],
             "dtypelab --help": [*dtypelab, "--help"],
             "dtypelab --version": [*dtypelab, "--version"],
             "dtypelab formats": [*dtypelab, "formats"],
             "dtypelab convert --help": [*dtypelab, "convert", "--help"],
             "dtypelab compare --help": [*dtypelab, "compare", "--help"]}
    if (BIN / "hf").exists():
        found["hf --help"] = [str(BIN / "hf"), "--help"]
    return found


def run(rounds: int = ROUNDS) -> Table:
    compileall.compile_dir(ROOT / "src" / "dtypelab", quiet=1)
    with tempfile.TemporaryDirectory() as bare:  # a copy of dtypelab without bytecode, none written
        shutil.copytree(ROOT / "src" / "dtypelab", Path(bare) / "dtypelab",
                        ignore=shutil.ignore_patterns("__pycache__"))
        no_bytecode = "dtypelab --help, no bytecode"
        methods = {**commands(), no_bytecode: [sys.executable, "-m", "dtypelab.cli", "--help"]}
        envs = {no_bytecode: {"PYTHONPATH": bare, "PYTHONDONTWRITEBYTECODE": "1"}}
        load_before = os.getloadavg()
        seconds = {name: [] for name in methods}
        for round_index in range(rounds + 1):
            for name, command in methods.items():
                elapsed = _timed(command, envs.get(name, {}))
                if round_index:  # the first round warms the page cache
                    seconds[name].append(elapsed)
        load_after = os.getloadavg()
    floor = statistics.median(seconds["python -c pass (floor)"])
    torch_s = statistics.median(seconds["python -c 'import torch'"])
    rows = [[name, statistics.median(s), f"{min(s):.3f}-{max(s):.3f}", statistics.median(s) / floor,
             statistics.median(s) / torch_s] for name, s in seconds.items()]
    helps = seconds["dtypelab --help"]
    verdict = "met" if statistics.median(helps) <= GOAL_S else "NOT met"
    notes = [f"{rounds} rounds after a warm-up round, commands in turns, each a fresh process; load average "
             f"{load_before[0]:.2f} before, {load_after[0]:.2f} after, {os.cpu_count()} cores",
             f"goal (issue 16 item 1): dtypelab --help <= {GOAL_S} s: median "
             f"{statistics.median(helps):.3f} s (max {max(helps):.3f} s) -> {verdict}"]
    return Table("Start-up in a fresh process", COLUMNS, rows, notes)


def _timed(command: list[str], extra_env: dict[str, str]) -> float:
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           **extra_env}  # extra_env's PYTHONPATH (the bare copy) replaces the checkout's
    start = time.perf_counter()
    subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


if __name__ == "__main__":
    print_table(run())
