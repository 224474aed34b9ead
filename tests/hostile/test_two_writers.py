"""Complete-or-absent with two writers (issue 18 item 6): the second conversion onto one -o never
silently replaces the first; the final rename refuses a destination that appeared after its start."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from dtypelab.checkpoint import StagedOutput
from dtypelab.checkpoint.staging import _rename_no_replace
from dtypelab.errors import CheckpointError


def staged_file(output: StagedOutput, text: str) -> None:
    (output.tmp / output.dst.name).write_text(text)


def test_the_later_commit_is_refused_and_the_first_output_kept(tmp_path):
    dst = tmp_path / "out.safetensors"
    refused = pytest.raises(CheckpointError, match="appeared while this conversion ran")
    with refused, StagedOutput(dst, force=False) as first, StagedOutput(dst, force=False) as second:
        staged_file(first, "first")
        staged_file(second, "second")
        second.commit(dst_is_file=True)
        first.commit(dst_is_file=True)
    assert dst.read_text() == "second"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.safetensors"]  # no staging folder left


def test_folders_too(tmp_path):
    dst = tmp_path / "out"
    refused = pytest.raises(CheckpointError, match="appeared")
    with refused, StagedOutput(dst, force=False) as first, StagedOutput(dst, force=False) as second:
        (first.tmp / "a.json").write_text("first")
        (second.tmp / "b.json").write_text("second")
        second.commit(dst_is_file=False)
        first.commit(dst_is_file=False)
    assert sorted(p.name for p in dst.iterdir()) == ["b.json"]


def test_an_empty_folder_that_appeared_is_not_replaced(tmp_path):
    """A plain rename replaces an empty folder silently; the staged rename must not."""
    dst = tmp_path / "out"
    with pytest.raises(CheckpointError, match="appeared"), StagedOutput(dst, force=False) as output:
        (output.tmp / "a.json").write_text("x")
        dst.mkdir()
        output.commit(dst_is_file=False)
    assert list(dst.iterdir()) == []


def test_force_replaces_what_appeared(tmp_path):
    dst = tmp_path / "out.safetensors"
    with StagedOutput(dst, force=True) as output:
        staged_file(output, "mine")
        dst.write_text("theirs")
        output.commit(dst_is_file=True)
    assert dst.read_text() == "mine"


def test_rename_no_replace_refuses_anything_there(tmp_path):
    source, target = tmp_path / "a", tmp_path / "b"
    source.mkdir()
    target.mkdir()
    with pytest.raises(FileExistsError):
        _rename_no_replace(source, target)
    os.rmdir(target)
    _rename_no_replace(source, target)
    assert target.is_dir() and not source.exists()


WRITER = """
import sys, time
from pathlib import Path
from dtypelab.checkpoint import StagedOutput
from dtypelab.errors import CheckpointError
dst, text, go = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
try:
    with StagedOutput(dst, force=False) as output:
        (output.tmp / dst.name).write_text(text)
        (go.parent / (text + ".ready")).touch()
        while not go.exists():
            time.sleep(0.01)
        output.commit(dst_is_file=True)
except CheckpointError:
    sys.exit(2)
"""


def test_two_processes_one_wins_whole(tmp_path):
    dst, go = tmp_path / "out" / "m.safetensors", tmp_path / "go"
    (tmp_path / "out").mkdir()
    writers = [subprocess.Popen([sys.executable, "-c", WRITER, str(dst), name, str(go)])
               for name in ("a", "b")]
    while not all((tmp_path / f"{name}.ready").exists() for name in ("a", "b")):
        assert all(w.poll() is None for w in writers)
    go.touch()
    codes = sorted(w.wait(timeout=120) for w in writers)
    assert codes == [0, 2]
    assert dst.read_text() in ("a", "b")
    assert sorted(p.name for p in dst.parent.iterdir()) == ["m.safetensors"]
