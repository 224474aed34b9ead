"""Readable terminal output: default tables fit 100 columns, --columns chooses, colour only on a terminal."""

from __future__ import annotations

import os
import pty
import subprocess
import sys

import pytest

from dtypelab.report import TEXT_WIDTH
from helpers import run_cli

ANSI = "\x1b["
TEXT = ("--text", "The cat sat on the mat.", "--text", "Why do leaves change colour?")


@pytest.mark.parametrize("argv", [
    ("compare", "dummy", "--to", "fp16,bf16,int8,int4:g129"),  # a failed row's reason becomes a note
    ("compare", "dummy", "--to", "bf16,int8", "--time"),
    ("compare", "tiny-llama", "--to", "fp16,bf16,int8", *TEXT),  # with the next-token report
    ("compare", "tiny-llama", "--to", "fp16,int8", "--layers", *TEXT),
    ("headroom", "tiny-llama", "--to", "fp16,bf16", "--weights", *TEXT),
    ("inspect", "tiny-llama"),
    ("cast", "tiny-gpt2", "--to", "bf16"),  # tied: the shares_with column is shown
    ("formats",),
])
def test_default_tables_fit_a_100_column_terminal(capsys, argv):
    pytest.importorskip("transformers")
    code, out, _ = run_cli(capsys, *argv)
    assert code in (0, 4)  # 4: the int4:g129 row failed, as it should
    too_wide = [line for line in out.splitlines() if len(line) > TEXT_WIDTH]
    assert not too_wide, too_wide
    unwrapped = " ".join(out.split())  # notes wrap at the width
    assert "more column(s) not shown:" in unwrapped and "(--columns all or --json shows them)" in unwrapped


def test_convert_prints_a_table_that_fits(capsys, tmp_path, sharded_llama_folder):
    code, out, _ = run_cli(capsys, "convert", sharded_llama_folder, "--to", "int8", "-o", tmp_path / "w8")
    assert code == 0 and max(len(line) for line in out.splitlines()) <= TEXT_WIDTH
    assert out.splitlines()[1].split() == ["name", "output_dtype", "overflowed", "flushed_to_zero", "sqnr_db"]


def test_columns_chooses_by_header_name(capsys):
    code, out, _ = run_cli(capsys, "compare", "dummy", "--to", "fp16,bf16",
                           "--columns", "SQNR_DB,stored_bytes")
    assert code == 0
    lines = out.splitlines()
    assert lines[1].split() == ["variant", "stored_bytes", "sqnr_db"]  # the key column, then table order
    assert [line.split()[0] for line in lines[3:5]] == ["fp16", "bf16"]
    assert "not shown" not in out  # the user chose: no note about the rest
    _, every, _ = run_cli(capsys, "compare", "dummy", "--to", "fp16", "--columns", "all")
    assert {"dtype", "mean_abs_diff", "max_abs_diff", "relative_error"} <= set(every.splitlines()[1].split())


def test_columns_of_headroom_and_weights_are_checked_together(capsys):
    code, out, _ = run_cli(capsys, "headroom", "dummy", "--weights", "--columns", "overflowed,kurtosis")
    assert code == 0
    headers = [line.split() for line in out.splitlines() if line.startswith(("layer ", "parameter "))]
    assert headers == [["layer", "overflowed"], ["parameter", "kurtosis"]]


def test_an_unknown_column_is_exit_2_with_a_did_you_mean_after_the_result(capsys):
    code, out, err = run_cli(capsys, "compare", "dummy", "--to", "bf16", "--columns", "variant,sqnr")
    assert code == 2
    assert err.strip().splitlines() == [err.strip()]  # one line
    assert err.startswith("error: --columns: unknown column 'sqnr' (did you mean 'sqnr_db'?)")
    assert "Comparison against the reference" in out  # the finished result is not lost


@pytest.mark.parametrize(("argv", "message"), [
    (("formats", "--columns", "name,"), "an empty column name"),
    (("formats", "--columns", "all,name"), "give all alone"),
    (("formats", "--columns", "name", "--json"), "--json holds every field"),
])
def test_bad_column_choices_are_refused_up_front(capsys, argv, message):
    code, out, err = run_cli(capsys, *argv)
    assert code == 2 and out == "" and message in err


def test_colour_on_a_terminal_and_none_with_no_color(capsys, monkeypatch):
    monkeypatch.setattr("dtypelab.cli.common.stdout_is_terminal", lambda: True)
    monkeypatch.delenv("NO_COLOR", raising=False)
    code, out, _ = run_cli(capsys, "compare", "dummy", "--to", "bf16,int4:g129")
    assert code == 4
    header = next(line for line in out.splitlines() if "variant" in line)
    failed = next(line for line in out.splitlines() if "int4:g129" in line and "failed" in line)
    assert header.startswith("\x1b[1mvariant")  # bold header
    assert failed.startswith("\x1b[31mint4:g129") and "\x1b[31mfailed" in failed  # the failed row red
    bf16 = next(line for line in out.splitlines() if line.startswith("bf16"))
    assert ANSI not in bf16  # an ok row stays plain
    monkeypatch.setenv("NO_COLOR", "1")
    _, plain, _ = run_cli(capsys, "compare", "dummy", "--to", "bf16,int4:g129")
    assert ANSI not in plain and "failed" in plain


def _run_on_pty(argv: list[str], env: dict[str, str]) -> str:
    """Run ``dtypelab ARGV`` with stdout on a pseudo-terminal; what it printed there."""
    leader, follower = pty.openpty()
    done = subprocess.run([sys.executable, "-m", "dtypelab.cli", *argv], stdout=follower,
                          stderr=subprocess.PIPE, env=env, timeout=300)
    os.close(follower)
    chunks = []
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # the terminal is closed once everything is read (EIO on Linux)
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(leader)
    assert done.returncode == 0, done.stderr
    return b"".join(chunks).decode()


def test_a_real_terminal_gets_colour_a_pipe_and_no_color_do_not():
    env = {k: v for k, v in os.environ.items() if k != "NO_COLOR"}
    assert "\x1b[1mname" in _run_on_pty(["formats"], env)  # the header, bold
    assert ANSI not in _run_on_pty(["formats"], {**env, "NO_COLOR": "1"})
    piped = subprocess.run([sys.executable, "-m", "dtypelab.cli", "formats"], capture_output=True, text=True,
                           env=env, timeout=300)
    assert piped.returncode == 0 and "name" in piped.stdout and ANSI not in piped.stdout
