"""``python -m benchmarks NAME`` selects exactly one benchmark (issue 16 item 5); nothing here runs one."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _bench_main():
    """``benchmarks/__main__.py``: the benchmarks live beside ``src/``, not in the installed package."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    return importlib.import_module("benchmarks.__main__")


bench_main = _bench_main()
NAMES = ["bench_convert", "bench_convert_quantized", "bench_quantize"]


def test_a_name_selects_exactly_that_benchmark_not_those_containing_it():
    assert bench_main.select(NAMES, ["convert"]) == ["bench_convert"]
    assert bench_main.select(NAMES, ["bench_convert"]) == ["bench_convert"]
    assert bench_main.select(NAMES, ["convert_quantized"]) == ["bench_convert_quantized"]


def test_nothing_selected_runs_all_and_several_names_keep_the_listed_order():
    assert bench_main.select(NAMES, []) == NAMES
    assert bench_main.select(NAMES, ["quantize", "convert"]) == ["bench_convert", "bench_quantize"]


def test_an_unknown_or_partial_name_is_refused_with_the_names():
    with pytest.raises(bench_main.UnknownBenchmark, match="no benchmark named conv; the names are: convert, "
                                                            "convert_quantized, quantize"):
        bench_main.select(NAMES, ["conv"])


def test_the_real_benchmarks_are_found():
    names = bench_main.available()
    assert "bench_convert" in names and "bench_convert_quantized" in names
    assert all(n.startswith("bench_") for n in names) and names == sorted(names)


def test_main_runs_only_the_selected_module(monkeypatch, capsys):
    imported = []

    class Fake:
        @staticmethod
        def run():
            return None

    monkeypatch.setattr(bench_main, "available", lambda: NAMES)
    monkeypatch.setattr(bench_main.importlib, "import_module", lambda name: imported.append(name) or Fake)
    monkeypatch.setattr(bench_main, "print_table", lambda table: None)
    assert bench_main.main(["convert"]) == 0
    assert imported == ["benchmarks.bench_convert"]


def test_the_command_line_exits_2_with_one_line_before_running_anything():
    done = subprocess.run([sys.executable, "-m", "benchmarks", "no_such_bench"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stdout == ""  # not even the machine line: nothing ran
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "no_such_bench" in lines[0] and "convert_quantized" in lines[0]
