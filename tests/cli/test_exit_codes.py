"""Exit codes a script can trust, checks before any work, and no result lost to a side output.

0 ok; 2 bad input (nothing ran); 3 --strict refused; 4 some variant failed (result printed); 5 a side
output not written (result printed); 130 interrupted (subprocess tests: SIGINT and SIGTERM).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from dtypelab.errors import EXIT_CODES
from helpers import run_cli


@pytest.fixture
def no_load(monkeypatch):
    """Any model load fails the test: what is checked up front must be refused before it."""
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the bad input was refused")

    monkeypatch.setattr("dtypelab.models.load", refuse)  # the CLI calls models.load


def one_line_exit_2(capsys, *argv) -> str:
    code, out, err = run_cli(capsys, *argv)
    assert code == 2 and out == "", err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    return err


# --- 4: a variant failed -----------------------------------------------------------------------------

@pytest.mark.parametrize(("argv", "failed"), [
    (["--to", "bf16,int4:g129"], "1 of 2 variant(s) failed: int4:g129"),  # 129 divides no row of it
    (["--to", "bf16", "--keep", "nosuch*"], "1 of 1 variant(s) failed: bf16"),
    (["--to", "int4:g129", "--layers"], "1 of 1 variant(s) failed: int4:g129"),
])
def test_a_failed_variant_prints_the_result_then_exits_4(capsys, argv, failed):
    code, out, err = run_cli(capsys, "compare", "tiny-llama", "--text", "A short sentence.", *argv)
    assert code == 4 and EXIT_CODES[4].startswith("some variant failed")
    assert "failed:" in out  # the whole result first, the failed row with its reason
    assert err.strip() == f"error: {failed} (each row says why)"


def test_a_failed_variant_in_json_is_still_the_whole_document(capsys):
    code, out, err = run_cli(capsys, "compare", "tiny-llama", "--to", "bf16,int4:g129", "--text", "Hi.",
                             "--json")
    assert code == 4 and "int4:g129" in err
    variants = json.loads(out)["variants"]
    assert [v["failure"] is None for v in variants] == [True, False]


def test_all_variants_ok_is_exit_0(capsys):
    code, _, err = run_cli(capsys, "compare", "tiny-llama", "--to", "bf16,int8", "--text", "Hi.")
    assert (code, err) == (0, "")


# --- 2: the words, checked before anything runs --------------------------------------------------------

@pytest.mark.parametrize(("argv", "message"), [
    (["compare", "dummy", "--to", "quanto:bogus"], "unknown peer 'quanto:bogus'"),
    (["compare", "dummy", "--to", "quanto:qint9"],
     "unknown peer 'quanto:qint9' (did you mean 'quanto:qint8'?)"),
    (["compare", "dummy", "--to", "bf61"], "unknown dtype or format 'bf61' (did you mean 'bf16'?)"),
    (["compare", "dummy", "--threshold", "20"], "--threshold needs --layers: add --layers or drop it"),
    (["compare", "dummy", "--mode", "isolated", "--depth", "2"],
     "--mode and --depth need --layers: add --layers or drop them"),
    (["compare", "dummy", "--layers", "--plot", "chart.pdf"], "use a name ending in .png or .svg"),
    (["compare", "dummy", "--layers", "--plot", "/nonexistent_dir/x.png"], "no folder /nonexistent_dir"),
])
def test_bad_words_and_paths_are_refused_before_any_model_loads(capsys, no_load, argv, message):
    assert message in one_line_exit_2(capsys, *argv)


@pytest.mark.parametrize("command", ["compare", "headroom", "inspect", "cast"])
def test_a_mistyped_model_name_gets_a_suggestion(capsys, command):
    extra = ["--to", "bf16"] if command == "cast" else []
    err = one_line_exit_2(capsys, command, "tiny-lama", *extra)
    assert "unknown model 'tiny-lama' (did you mean 'tiny-llama'?)" in err


def test_an_unwritable_folder_is_refused_up_front(capsys, no_load, monkeypatch, tmp_path):
    monkeypatch.setattr("dtypelab.cli.common.os.access", lambda path, mode: False)  # as a read-only mount
    err = one_line_exit_2(capsys, "compare", "dummy", "--layers", "--plot", tmp_path / "x.png")
    assert f"folder {tmp_path} is not writable" in err


def test_a_plot_inside_the_source_folder_is_refused(capsys, tmp_path):
    source = tmp_path / "model"
    source.mkdir()
    err = one_line_exit_2(capsys, "compare", source, "--layers", "--plot", source / "chart.png")
    assert "is inside the source" in err


# --- 5: the result is never lost to a side output --------------------------------------------------------

def test_a_plot_that_fails_after_the_work_keeps_the_table_and_exits_5(capsys, monkeypatch, tmp_path):
    def full_disk(result, path):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("dtypelab.cli.compare.plot_layers", full_disk)
    code, out, err = run_cli(capsys, "compare", "dummy", "--to", "bf16", "--layers", "--plot",
                             tmp_path / "x.png")
    assert code == 5 and "sqnr" in out.lower()  # the whole layer table was printed
    assert err.strip() == (f"error: the result is complete, but --plot {tmp_path / 'x.png'} could not be "
                           "written: No space left on device")


@pytest.fixture
def src(tmp_path):
    path = tmp_path / "in.safetensors"
    save_file({"w": torch.randn(16, 8), "norm": torch.ones(8)}, path)
    return path


def test_a_report_that_fails_after_the_rename_says_the_checkpoint_is_there(capsys, monkeypatch, tmp_path,
                                                                           src):
    import dtypelab.checkpoint as checkpoint_stage

    reports = tmp_path / "reports"
    reports.mkdir()
    real = checkpoint_stage.convert_checkpoint

    def convert_then_lose_the_folder(*args, **kwargs):
        result = real(*args, **kwargs)
        reports.rmdir()  # someone removed it while the conversion ran
        return result

    monkeypatch.setattr(checkpoint_stage, "convert_checkpoint", convert_then_lose_the_folder)
    code, out, err = run_cli(capsys, "convert", src, "--to", "bf16", "-o", tmp_path / "out.safetensors",
                             "--report", reports / "r.json")
    assert code == 5 and out.startswith("Conversion to bf16")
    assert "the result is complete, but --report" in err and "No such file or directory" in err
    assert (tmp_path / "out.safetensors").is_file()


@pytest.mark.parametrize(("extra", "message"), [
    (["--report", "{tmp}/r.txt"],
     "--report {tmp}/r.txt: cannot write a .txt file: use a name ending in .json"),
    (["--report", "{tmp}/none/r.json"], "no folder {tmp}/none"),
])
def test_convert_outputs_are_checked_before_anything_is_read(capsys, tmp_path, src, extra, message):
    extra = [e.format(tmp=tmp_path) for e in extra]
    err = one_line_exit_2(capsys, "convert", src, "--to", "bf16", "-o", tmp_path / "o.safetensors", *extra)
    assert message.format(tmp=tmp_path) in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.safetensors"]


def test_convert_into_its_own_source_folder_is_refused(capsys, tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    save_file({"w": torch.randn(4, 4)}, folder / "model.safetensors")
    err = one_line_exit_2(capsys, "convert", folder, "--to", "bf16", "-o", folder / "bf16")
    assert "is inside the source" in err and not (folder / "bf16").exists()


# --- 130: interrupted, one line, nothing half-written ----------------------------------------------------

BLOCKING_CONVERT = """
import sys, time
from pathlib import Path
import dtypelab.checkpoint.convert as convert
real = convert.write_shards
def slow(*args, **kwargs):
    Path(sys.argv[1]).write_text("staging")
    time.sleep(120)
convert.write_shards = slow
from dtypelab.cli import main
main(sys.argv[2:])
"""

SLOW_FACTORY = """
import time
from pathlib import Path
import torch


class Slow(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(4, 4)

    def forward(self, x):
        Path("ready").write_text("running")
        time.sleep(120)
        return self.linear(x)


def build():
    return Slow()
"""


def interrupt(argv: list[str], ready: Path, cwd: Path, signum: int) -> subprocess.CompletedProcess:
    """Start ``argv``, wait until it writes ``ready`` (in the middle of its work), send ``signum``."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    process = subprocess.Popen(argv, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=env)
    deadline = time.monotonic() + 240
    while not ready.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signum)
    out, err = process.communicate(timeout=120)
    return subprocess.CompletedProcess(argv, process.returncode, out, err)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_an_interrupted_convert_is_one_line_exit_130_and_leaves_nothing(tmp_path, src, signum):
    ready, out = tmp_path / "ready", tmp_path / "out"
    done = interrupt([sys.executable, "-c", BLOCKING_CONVERT, str(ready), "convert", str(src), "--to", "bf16",
                      "-o", str(out)], ready, tmp_path, signum)
    assert ready.exists(), done.stderr
    assert (done.returncode, done.stdout) == (130, "")
    assert done.stderr == f"interrupted: nothing written to {out}\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.safetensors", "ready"]  # no staging folder


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_an_interrupted_compare_of_a_factory_in_the_current_folder_is_one_line(tmp_path, signum):
    (tmp_path / "slowmodels.py").write_text(textwrap.dedent(SLOW_FACTORY))
    save_file({"x": torch.randn(2, 4)}, tmp_path / "x.safetensors")
    console_script = Path(sys.executable).parent / "dtypelab"  # not python -m: no current folder on its path
    done = interrupt([str(console_script), "compare", "slowmodels:build", "--input-file", "x.safetensors"],
                     tmp_path / "ready", tmp_path, signum)
    assert (done.returncode, done.stderr) == (130, "interrupted\n"), done.stderr


def test_the_readme_documents_every_exit_code():
    readme = (Path(__file__).parents[2] / "README.md").read_text(encoding="utf-8")
    for code, meaning in EXIT_CODES.items():
        assert f"| {code} | {meaning} |" in readme


@pytest.mark.parametrize(("array", "message"), [
    (lambda np: np.random.rand(2, 3, 4).astype("float32"), "floating inputs of shape [2, 3, 4] cannot feed"),
    (lambda np: np.random.rand(2, 3).astype("float32"), "read as inputs_embeds (batch, sequence, 256)"),
    (lambda np: np.ones((1, 2, 3), dtype="int64"), "token ids must be a (batch, sequence) matrix"),
])
def test_an_input_file_that_cannot_feed_the_model_is_one_line(capsys, tmp_path, array, message):
    np = pytest.importorskip("numpy")
    np.save(tmp_path / "x.npy", array(np))
    err = one_line_exit_2(capsys, "compare", "tiny-llama", "--to", "bf16", "--input-file", tmp_path / "x.npy")
    assert message in err
