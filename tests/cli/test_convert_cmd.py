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
    assert out.splitlines()[1].split() == ["name", "output_dtype", "overflowed", "flushed_to_zero",
                                           "max_rel_error"]
    assert out.splitlines()[3].split()[:4] == ["big", "float16", "1", "0"]  # the compact default columns
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
    real_no_replace = staging._rename_no_replace  # the final rename (renameat2, no os.rename)
    monkeypatch.setattr(staging, "_rename_no_replace", lambda a, b: renamed.append((len(synced), str(b)))
                        or real_no_replace(a, b))
    code, _, _ = run_cli(capsys, "convert", src, "--to", "bf16", "-o", tmp_path / "out", "--fsync")
    assert code == 0
    before_rename = synced[:renamed[-1][0]]
    assert any(p.endswith("in.safetensors") for p in before_rename)  # the data file, then its folder
    assert f".out.dtypelab-tmp-{os.getpid()}-" in before_rename[-1]  # the staging folder itself, last
    assert synced[-1] == str(tmp_path)  # the parent folder, after the rename
    synced.clear()
    run_cli(capsys, "convert", src, "--to", "bf16", "-o", tmp_path / "plain")
    assert synced == []  # off by default: cp does not wait for the disk either


def test_strict_refusal_still_writes_the_report(capsys, tmp_path, src):
    code, out, err = run_cli(capsys, "convert", src, "--to", "fp16", "-o", tmp_path / "out", "--strict",
                             "--report", tmp_path / "report.json")
    assert code == 3 and out == "" and len(err.strip().splitlines()) == 1
    assert err.startswith("error: tensor 'big': 1 values overflow in fp16; nothing was written (--strict): "
                          "keep it as stored with --keep 'big', let it through with --max-overflowed 1, or "
                          "drop --strict")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.safetensors", "report.json"]  # no output
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["refused"] is True and report["reason"] == err.strip().removeprefix("error: ")
    assert report["refused_tensors"] == ["big"] and report["bytes_written"] == 0
    # every tensor is counted, also those after the refused one
    assert {t["name"]: (t["action"], t["overflowed"]) for t in report["tensors"]} == {
        "w": ("cast", 0), "big": ("cast", 1), "norm": ("cast", 0), "ids": ("copied", 0)}


def test_max_overflowed_lets_one_overflow_through(capsys, tmp_path, src):
    code, _, err = run_cli(capsys, "convert", src, "--to", "fp16", "-o", tmp_path / "out", "--strict",
                           "--max-overflowed", "1", "--report", tmp_path / "report.json")
    assert code == 0 and err == ""
    assert load_file(tmp_path / "out" / "in.safetensors")["big"][0].item() == float("inf")
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["refused"] is False and report["limits"]["max_overflowed"] == 1


def test_strict_passes_a_negligible_flush_and_the_report_says_so(capsys, tmp_path):
    # N(0, 0.02), magnitudes floored at 1e-4 (nothing else flushes in fp16), one 1e-9: flushed, ~5e-8 of RMS
    torch.manual_seed(0)
    embed = torch.randn(512, 512) * 0.02
    embed = torch.where(embed.abs() < 1e-4, torch.full_like(embed, 1e-4), embed)
    embed[3, 7] = 1e-9
    save_file({"embed.weight": embed}, tmp_path / "in.safetensors")
    code, out, _ = run_cli(capsys, "convert", tmp_path / "in.safetensors", "--to", "fp16", "-o",
                           tmp_path / "out", "--strict", "--report", tmp_path / "report.json")
    assert code == 0 and "1 negligible flush(es) in 1 tensor(s)" in out
    row = json.loads((tmp_path / "report.json").read_text())["tensors"][0]
    assert (row["flushed_to_zero"], row["negligible_flushes"], row["significant_flushes"]) == (1, 1, 0)


@pytest.mark.parametrize(("args", "message"), [
    (["--max-flushed", "3"], "error: --max-flushed needs --strict (it loosens what --strict refuses): add "
                             "--strict or drop --max-flushed"),
    (["--max-overflowed", "1"], "error: --max-overflowed needs --strict"),
    (["--strict", "--max-flushed", "lots"], "error: --max-flushed takes a count (3) or a fraction of each "
                                            "tensor's values (1e-6), not 'lots'"),
])
def test_damage_limits_without_strict_or_malformed_are_one_line_exit_2(capsys, tmp_path, src, args, message):
    code, out, err = run_cli(capsys, "convert", src, "--to", "fp16", "-o", tmp_path / "out", *args,
                             "--report", tmp_path / "report.json")
    assert code == 2 and out == "" and err.startswith(message) and len(err.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.safetensors"]  # no output, no report
