"""Staging folders: a liveness lock decides what a later run may remove; --force replaces only what
dtypelab could have written."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from dtypelab.checkpoint import convert_checkpoint, remove_leftovers
from dtypelab.checkpoint.staging import FORCE_ANYTHING, LOCK_NAME, hold_lock, lock_is_held
from dtypelab.errors import CheckpointError
from helpers import run_cli

HOLDER = """
import sys, time
sys.path[:0] = {path!r}
from pathlib import Path
from dtypelab.checkpoint.staging import hold_lock
hold_lock(Path(sys.argv[1]))
Path(sys.argv[2]).write_text("locked")
time.sleep(120)
"""


def dead_pid() -> int:
    return int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True, check=True).stdout)


def staging_folder(parent: Path, name: str, pid: int) -> Path:
    folder = parent / f".{name}.dtypelab-tmp-{pid}-0a1b2c3d"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"partial")
    return folder


@pytest.fixture
def src(tmp_path) -> Path:
    path = tmp_path / "in.safetensors"
    save_file({"w": torch.randn(8, 8)}, path)
    return path


def test_a_folder_whose_lock_is_held_is_live_even_when_its_pid_is_not_ours(tmp_path):
    """Another container's run: its pid means nothing here, its lock does."""
    folder = staging_folder(tmp_path, "out", dead_pid())
    ready = tmp_path / "ready"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER.format(path=sys.path), str(folder / LOCK_NAME),
                               str(ready)])
    try:
        deadline = time.monotonic() + 120
        while not ready.exists() and holder.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert lock_is_held(folder / LOCK_NAME)
        assert remove_leftovers(tmp_path / "out") == [] and folder.exists()
    finally:
        holder.kill()
        holder.wait()
    assert not lock_is_held(folder / LOCK_NAME)  # the kernel dropped it with the process
    assert remove_leftovers(tmp_path / "out") == [folder] and not folder.exists()


def test_a_lock_held_in_this_process_is_live_and_unlocked_ones_are_stale(tmp_path):
    live, stale = staging_folder(tmp_path, "a", dead_pid()), staging_folder(tmp_path, "b", dead_pid())
    fd = hold_lock(live / LOCK_NAME)
    (stale / LOCK_NAME).write_text("123\n")  # a lock file nobody holds: its run was killed
    try:
        assert remove_leftovers(tmp_path / "c") == [stale]  # any destination in the same parent
        assert live.exists() and not stale.exists()
    finally:
        os.close(fd)


def test_a_running_conversion_holds_its_lock_and_the_output_has_none(tmp_path, src):
    seen = []

    def progress(event):
        seen.extend(lock_is_held(p / LOCK_NAME) for p in tmp_path.glob(".out*.dtypelab-tmp-*"))

    convert_checkpoint(src, tmp_path / "out", "bf16", progress=progress)
    assert seen and all(seen)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["in.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.safetensors", "out"]


def test_convert_says_which_stale_staging_folder_it_removed(capsys, tmp_path, src):
    stale = staging_folder(tmp_path, "other", dead_pid())
    code, _, err = run_cli(capsys, "convert", src, "--to", "bf16", "-o", tmp_path / "out")
    assert code == 0 and err == f"removed {stale}: the staging folder of a conversion that was killed\n"
    assert not stale.exists()


def test_force_replaces_a_checkpoint_folder_but_names_the_users_files(tmp_path, src):
    out = tmp_path / "out"
    convert_checkpoint(src, out, "fp16")
    (out / "config.json").write_text("{}")
    convert_checkpoint(src, out, "bf16", force=True)  # only a checkpoint's files: replaced
    (out / "notes.txt").write_text("precious")
    (out / "runs").mkdir()
    (out / "runs" / "log.csv").write_text("1,2")
    with pytest.raises(CheckpointError, match=r"also holds notes.txt, runs/log.csv: move them.*force twice"):
        convert_checkpoint(src, out, "fp16", force=True)
    assert (out / "notes.txt").read_text() == "precious"
    convert_checkpoint(src, out, "fp16", force=FORCE_ANYTHING)
    assert sorted(p.name for p in out.iterdir()) == ["in.safetensors"]


def test_force_twice_on_the_command_line(capsys, tmp_path, src):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("x")
    code, _, err = run_cli(capsys, "convert", src, "--to", "bf16", "-o", out, "--force")
    assert code == 2 and "mine.txt" in err and (out / "mine.txt").exists()
    code, _, err = run_cli(capsys, "convert", src, "--to", "bf16", "-o", out, "--force", "--force")
    assert code == 0, err
    assert not (out / "mine.txt").exists()
