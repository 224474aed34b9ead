"""`dtypelab clean`: lists killed conversions' staging folders, removes the stale ones, never a live one."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from dtypelab.checkpoint.staging import LOCK_NAME, hold_lock
from helpers import run_cli


def test_clean_lists_then_removes_only_stale_staging_folders(capsys, tmp_path):
    gone = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True, check=True).stdout)
    stale, live = tmp_path / f".a.dtypelab-tmp-{gone}-0a1b2c3d", tmp_path / f".b.dtypelab-tmp-{gone}-1a2b3c4d"
    for folder in (stale, live):
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(bytes(1000))
    (stale / LOCK_NAME).write_text("1\n")  # nobody holds it: its run was killed
    fd = hold_lock(live / LOCK_NAME)
    try:
        code, out, _ = run_cli(capsys, "clean", tmp_path, "--dry-run")
        assert code == 0 and stale.exists() and live.exists()
        assert f"{stale.name}  stale (would be removed)" in out and "live: a conversion is running" in out
        code, out, _ = run_cli(capsys, "clean", tmp_path, "--json")
        assert code == 0 and not stale.exists() and live.exists()
        report = json.loads(out)
        assert report["schema"] == "dtypelab/leftovers/1"
        assert [(lo["stale"], lo["nbytes"] >= 1000) for lo in report["leftovers"]] == [(True, True),
                                                                                       (False, True)]
    finally:
        os.close(fd)
