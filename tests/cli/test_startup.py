"""Start-up and a clean terminal: help imports no torch, transformers or peer; nothing stray on stderr."""

from __future__ import annotations

import subprocess
import sys

import pytest

HEAVY = ("torch", "transformers", "torchao", "optimum", "matplotlib", "safetensors", "numpy")

PROBE = """
import sys
from dtypelab.cli import main
for argv in {argvs!r}:
    try:
        main(argv)
    except SystemExit:
        pass
    print("IMPORTED", argv, sorted({{m.split('.')[0] for m in sys.modules}} & set({heavy!r})))
"""


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


COMMANDS = ("inspect", "cast", "compare", "headroom", "convert", "formats", "demo", "sensitivity", "plan",
            "report", "clean")


def test_the_command_list_is_every_command():
    from dtypelab.cli import cli

    assert set(cli.commands) == set(COMMANDS)


def test_help_version_and_formats_import_no_heavy_package():
    """issue 16 item 1: torch's import is ~90% of a bare start-up; none of these touch a tensor."""
    argvs = [["--help"], ["--version"], ["formats"], ["formats", "--json"],
             ["formats", "int4:g64:asym,nvfp4"], *([c, "--help"] for c in COMMANDS)]
    done = run_python(PROBE.format(argvs=argvs, heavy=HEAVY))
    assert done.returncode == 0 and done.stderr == "", done.stderr
    report = [line for line in done.stdout.splitlines() if line.startswith("IMPORTED")]
    assert report == [f"IMPORTED {argv} []" for argv in argvs]


def test_the_seed_demo_says_nothing_on_stderr():
    done = subprocess.run([sys.executable, "-m", "dtypelab.cli", "demo", "--seed-only"], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0 and "Mean diff: 0.0009978810558095574" in done.stdout
    assert done.stderr == ""


NOISY_IMPORT = "import {first}; import transformers, torchao; from transformers import LlamaForCausalLM"


def test_importing_dtypelab_drops_the_known_import_noise_and_debug_shows_it():
    pytest.importorskip("torchao")
    bare = run_python(NOISY_IMPORT.format(first="sys"))
    if "Failed to load" not in bare.stderr and "natively supported" not in bare.stderr:
        pytest.skip("torchao loads quietly here (its CUDA kernels load): nothing to drop")
    assert run_python(NOISY_IMPORT.format(first="dtypelab")).stderr == ""
    debug = run_python("import dtypelab.cli, sys; dtypelab.quiet.drop_known_noise(False); "
                       + NOISY_IMPORT.format(first="sys"))
    assert "Failed to load" in debug.stderr or "natively supported" in debug.stderr


def test_a_compare_with_peers_says_nothing_on_stderr():
    pytest.importorskip("optimum.quanto")
    done = subprocess.run([sys.executable, "-m", "dtypelab.cli", "compare", "tiny-llama", "--to",
                           "bf16,quanto:qint8", "--no-time", "--text", "A short sentence."],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
