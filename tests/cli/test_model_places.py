"""Models where people keep them: a Hugging Face repo id in the local cache (offline), a factory module in
the current folder."""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from helpers import run_cli

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hf_cache(tmp_path, monkeypatch, sharded_llama_folder):
    """A Hugging Face cache holding ``me/tiny`` (tiny-llama) as ``hf download`` lays it out."""
    repo = tmp_path / "hub" / "models--me--tiny"
    shutil.copytree(sharded_llama_folder, repo / "snapshots" / COMMIT)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))  # read once, at its import
    return tmp_path / "hub"


def test_a_repo_id_in_the_local_cache_resolves_offline(capsys, hf_cache):
    code, out, err = run_cli(capsys, "inspect", "me/tiny")
    assert code == 0, err
    assert "model.embed_tokens.weight" in out


def test_a_repo_id_not_in_the_cache_names_the_download_command(capsys, hf_cache):
    code, out, err = run_cli(capsys, "inspect", "me/absent")
    assert code == 2 and out == ""
    assert "download it once with `hf download me/absent`" in err and "HF_HUB_OFFLINE is set" in err
    assert len(err.strip().splitlines()) == 1


def test_a_factory_in_the_current_folder_imports_from_the_console_script(tmp_path):
    (tmp_path / "mymodels.py").write_text(textwrap.dedent("""
        import torch

        def build():
            return torch.nn.Sequential(torch.nn.Linear(4, 4))
    """))
    console_script = Path(sys.executable).parent / "dtypelab"  # sys.path[0] is its bin folder, not cwd
    done = subprocess.run([str(console_script), "inspect", "mymodels:build"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "0.weight" in done.stdout
