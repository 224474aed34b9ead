"""`dtypelab convert`: thin over convert_checkpoint; one-line errors, exit 2 (3 for refused damage)."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from dtypelab.cli.convert import ProgressLine
from dtypelab.progress import ProgressEvent
from helpers import run_cli


@pytest.fixture
def src(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "in.safetensors"
    save_file({"w": torch.randn(16, 8), "norm": torch.ones(8), "big": torch.tensor([1e6, 1.0]),
               "ids": torch.arange(4)}, path)
    return path


def test_convert_writes_report_and_prints_worst_tensors(capsys, tmp_path, src):
    code, out, err = run_cli(capsys, "convert", src, "--to", "fp16", "-o", tmp_path / "out", "--keep", "norm",
                         "--report", tmp_path / "report.json", "--verify")
    assert code == 0 and err == ""  # not a terminal: no progress line
    assert out.splitlines()[0] == "Conversion to fp16: most damaged tensors"
    assert out.splitlines()[3].split()[:5] == ["big", "float32", "float16", "2", "1"]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["total"]["overflowed"] == 1 and report["verified"] is True
    assert {t["name"]: t["action"] for t in report["tensors"]} == {"w": "cast", "big": "cast",
                                                                  "norm": "kept", "ids": "copied"}
    assert load_file(tmp_path / "out" / "in.safetensors")["norm"].dtype == torch.float32


def test_convert_json_and_quiet(capsys, tmp_path, src):
    code, out, _ = run_cli(capsys, "convert", src, "--to", "bf16", "-o", tmp_path / "a", "--json")
    assert code == 0 and json.loads(out)["format"] == "bf16"
    code, out, err = run_cli(capsys, "convert", src, "--to", "bf16", "-o", tmp_path / "b", "--quiet")
    assert (code, out, err) == (0, "", "")


def test_strict_exits_3_with_nothing_written(capsys, tmp_path, src):
    code, out, err = run_cli(capsys, "convert", src, "--to", "fp16", "-o", tmp_path / "out", "--strict")
    assert code == 3 and out == "" and "'big'" in err and len(err.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.safetensors"]


@pytest.mark.parametrize(("make", "message"), [
    (lambda p: p.write_bytes(p.read_bytes()[:-3]), "data ends at byte"),
    (lambda p: p.write_bytes(b"\x10" + bytes(7) + b"{not json!}....."), "not valid JSON"),
    (lambda p: p.write_bytes(b"\xff" * 8), "exceeds the"),
])
def test_bad_checkpoint_is_one_line_exit_2(capsys, tmp_path, src, make, message):
    make(src)
    code, out, err = run_cli(capsys, "convert", src, "--to", "bf16", "-o", tmp_path / "out")
    assert code == 2 and out == "" and message in err and str(src) in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.safetensors"]


def test_existing_output_and_unknown_format(capsys, tmp_path, src):
    (tmp_path / "out").mkdir()
    code, _, err = run_cli(capsys, "convert", src, "--to", "bf16", "-o", tmp_path / "out")
    assert code == 2 and "already exists" in err and "--force" in err
    code, _, err = run_cli(capsys, "convert", src, "--to", "fp17", "-o", tmp_path / "x")
    assert code == 2 and "unknown dtype or format 'fp17'" in err


def test_progress_line_shows_bytes_rate_and_time_left(capsys):
    progress = ProgressLine()
    progress(ProgressEvent("convert", 0, 2 * 10**9, "bytes"))
    progress(ProgressEvent("convert", 2 * 10**9, 2 * 10**9, "bytes"))
    err = capsys.readouterr().err
    assert "2.00/2.00 GB" in err and "MB/s" in err and "s left" in err and err.endswith("\n")
    stopped = ProgressLine()
    stopped.shown -= 1.0  # as if the last redraw were a second ago
    stopped(ProgressEvent("convert", 10**9, 2 * 10**9, "bytes"))
    stopped.close()  # an error follows: the half-drawn line is ended first
    err = capsys.readouterr().err
    assert err.startswith("\r1.00/2.00 GB") and err.endswith(" \n")


def test_report_path_is_checked_before_anything_is_written(capsys, tmp_path, src):
    code, out, err = run_cli(capsys, "convert", src, "--to", "bf16", "-o", tmp_path / "out",
                             "--report", tmp_path / "no" / "such" / "r.json")
    assert code == 2 and "--report" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_fsync_flushes_every_output_file_before_the_rename(capsys, tmp_path, src, monkeypatch):
    import dtypelab.checkpoint.staging as staging

    synced, renamed = [], []
    real_fsync, real_rename = os.fsync, os.rename
    monkeypatch.setattr(staging.os, "fsync", lambda fd: synced.append(os.readlink(f"/proc/self/fd/{fd}"))
                        or real_fsync(fd))
    monkeypatch.setattr(staging.os, "rename", lambda a, b: renamed.append((len(synced), str(b)))
                        or real_rename(a, b))
    code, _, _ = run_cli(capsys, "convert", src, "--to", "bf16", "-o", tmp_path / "out", "--fsync")
    assert code == 0
    before_rename = synced[:renamed[-1][0]]
    assert any(p.endswith("in.safetensors") for p in before_rename)  # the data file, then its folder
    assert f".out.dtypelab-tmp-{os.getpid()}-" in before_rename[-1]  # the staging folder itself, last
    assert synced[-1] == str(tmp_path)  # the parent folder, after the rename
    synced.clear()
    run_cli(capsys, "convert", src, "--to", "bf16", "-o", tmp_path / "plain")
    assert synced == []  # off by default: cp does not wait for the disk either
