"""Output permissions follow the source (issue 18 item 6): a private model (0700 folder, 0600 files)
converts to a private output, never to 0755 / 0644; an ordinary one gets what the umask gives."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from dtypelab.checkpoint import convert_checkpoint


def modes(folder: Path) -> dict[str, int]:
    """Relative path -> permission bits, for the folder ('.') and everything in it."""
    return {str(p.relative_to(folder)): stat.S_IMODE(p.stat().st_mode) for p in [folder, *folder.rglob("*")]}


def make_private(folder: Path) -> None:
    for path in folder.rglob("*"):
        path.chmod(0o700 if path.is_dir() else 0o600)
    folder.chmod(0o700)


@pytest.fixture
def umask():
    """Set the umask for one test, then restore it."""
    previous = os.umask(0o022)
    yield lambda value: os.umask(value)
    os.umask(previous)


@pytest.mark.parametrize("to", ["bf16", "int8"])
def test_a_private_folder_converts_to_a_private_output(tmp_path, tiny_folder, umask, to):
    (tiny_folder / "notes.txt").write_text("private")
    make_private(tiny_folder)
    out = tmp_path / "out"
    convert_checkpoint(tiny_folder, out, to)
    found = modes(out)
    assert found.pop(".") == 0o700
    assert found and set(found.values()) == {0o600}, found  # config.json rewritten, notes.txt copied


def test_an_ordinary_folder_gets_what_the_umask_gives(tmp_path, tiny_folder, umask):
    for path in tiny_folder.iterdir():
        path.chmod(0o644)
    tiny_folder.chmod(0o755)
    umask(0o002)
    out = tmp_path / "out"
    convert_checkpoint(tiny_folder, out, "bf16")
    found = modes(out)
    assert found.pop(".") == 0o755 and set(found.values()) == {0o644}  # never wider than the source
    umask(0o077)
    convert_checkpoint(tiny_folder, tmp_path / "narrow", "bf16")
    assert set(modes(tmp_path / "narrow").values()) == {0o700, 0o600}


def test_a_group_readable_source_stays_group_readable_under_a_wide_umask(tmp_path, tiny_folder, umask):
    for path in tiny_folder.iterdir():
        path.chmod(0o640)
    tiny_folder.chmod(0o750)
    umask(0o002)  # would give 0775 / 0664
    convert_checkpoint(tiny_folder, tmp_path / "out", "bf16")
    found = modes(tmp_path / "out")
    assert found.pop(".") == 0o750 and set(found.values()) == {0o640}


def test_a_private_file_converts_to_a_private_file(tmp_path, umask):
    source = tmp_path / "w.safetensors"
    save_file({"w": torch.ones(4)}, source)
    source.chmod(0o600)
    out = tmp_path / "w-fp16.safetensors"
    convert_checkpoint(source, out, "fp16")
    assert stat.S_IMODE(out.stat().st_mode) == 0o600


def test_a_private_pickle_folder_converts_to_a_private_output(tmp_path, umask):
    """--allow-pickle converts a safetensors copy of the pickles: the output follows the pickles, not the
    copy (which the umask would have made 0644)."""
    source = tmp_path / "pickled"
    source.mkdir()
    torch.save({"layer.weight": torch.randn(8, 8)}, source / "pytorch_model.bin")
    make_private(source)
    out = tmp_path / "out"
    convert_checkpoint(source, out, "bf16", allow_pickle=True)
    found = modes(out)
    assert found.pop(".") == 0o700 and found and set(found.values()) == {0o600}, found
