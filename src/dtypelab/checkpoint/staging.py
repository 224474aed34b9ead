"""Outputs that are complete or absent: written in a temporary folder, renamed into place when done.

A run that fails removes its temporary folder; a run that is killed cannot, so every temporary folder
carries its process id and the next run for the same destination removes those whose process is gone.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
from pathlib import Path

from ..errors import CheckpointError


class StagedOutput:
    """A temporary folder beside the destination, renamed into place by :meth:`commit`, else removed."""

    def __init__(self, dst: Path, force: bool):
        self.dst, self.force = dst, force
        self.tmp = dst.parent / f".{dst.name}.dtypelab-tmp-{os.getpid()}-{secrets.token_hex(4)}"
        self.committed = False

    def __enter__(self) -> StagedOutput:
        self.dst.parent.mkdir(parents=True, exist_ok=True)
        remove_leftovers(self.dst)
        if self.dst.exists() and not self.force:
            raise CheckpointError(f"{self.dst}: already exists: choose another output or pass --force")
        if self.dst.exists() and not _replaceable(self.dst):
            raise CheckpointError(f"{self.dst}: --force replaces only a checkpoint (a .safetensors file, or "
                                  "a folder with config.json or .safetensors files), and this is neither: "
                                  "choose another output")
        self.tmp.mkdir()
        return self

    def commit(self, dst_is_file: bool, durable: bool = False) -> None:
        """Rename the staged output into place. ``durable`` first flushes every staged file and folder
        to disk (fsync), and the parent folder after the rename, so that a power loss too leaves either
        the old destination or the complete new one: a rename can reach the disk before the data."""
        staged = self.tmp / self.dst.name if dst_is_file else self.tmp
        old = self.dst.parent / f".{self.dst.name}.dtypelab-old-{os.getpid()}-{secrets.token_hex(4)}"
        if durable:
            _sync_tree(self.tmp)
        if self.dst.exists() or self.dst.is_symlink():
            os.rename(self.dst, old)
        os.rename(staged, self.dst)
        if durable:
            _sync(self.dst.parent)
        self.committed = True
        _remove(old)
        _remove(self.tmp)

    def __exit__(self, exc_type, exc, traceback) -> None:
        if not self.committed:
            _remove(self.tmp)
        if isinstance(exc, CheckpointError) and str(self.tmp) in str(exc):  # name what the user gave
            message = str(exc).replace(str(self.tmp / self.dst.name), str(self.dst))  # a file output
            exc.args = (message.replace(str(self.tmp), str(self.dst)),)


def _sync_tree(folder: Path) -> None:
    """fsync every file below ``folder``, then every folder, deepest first."""
    paths = sorted(folder.rglob("*"), key=lambda p: -len(p.parts))
    for path in [p for p in paths if p.is_file()] + [p for p in paths if p.is_dir()] + [folder]:
        _sync(path)


def _sync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _replaceable(path: Path) -> bool:
    """Whether ``--force`` may delete ``path``: a checkpoint file, an empty folder or a model folder."""
    if not path.is_dir() or path.is_symlink():
        return path.suffix == ".safetensors"
    return all(False for _ in path.iterdir()) or any(
        p.suffix == ".safetensors" or p.name == "config.json" for p in path.iterdir())


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


def remove_leftovers(dst: str | os.PathLike) -> list[Path]:
    """Remove temporary folders that conversions into ``dst`` left when they were killed.

    A leftover carries the process id of its run; only those whose process is gone are removed.

    Returns:
        The paths removed.
    """
    dst = Path(dst)
    removed = []
    for leftover in dst.parent.glob(f".{_glob_escape(dst.name)}.dtypelab-*-*-*"):
        match = re.fullmatch(r"\.dtypelab-(?:tmp|old)-(\d+)-[0-9a-f]+", leftover.name[len(dst.name) + 1:])
        if match and not _process_alive(int(match.group(1))):
            _remove(leftover)
            removed.append(leftover)
    return removed


def _glob_escape(name: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", name)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
