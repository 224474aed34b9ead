"""Outputs that are complete or absent: written in a temporary folder, renamed into place when done.

A run that fails removes its temporary folder; a run that is killed cannot, so every temporary folder
holds a liveness marker, a lock file (:data:`LOCK_NAME`) its run keeps locked (``flock``) while it
writes: the kernel drops the lock when the process dies, however it dies. Any later conversion into the
same parent folder removes the staging folders whose lock nobody holds, and never touches a live run's
(another writer's, a worker's, one in another container whose process ids this one cannot see). A folder
without a lock file (the old destination set aside during the rename, or a folder from an older
dtypelab) falls back to its process id.

Two writers onto one destination: the final rename never replaces a destination that appeared (or was
replaced) after this run started, unless ``--force``: it is a no-replace rename (Linux ``renameat2``
``RENAME_NOREPLACE``; elsewhere a check just before ``rename``), so the second run fails in one line and
the first run's output stays whole.

Permissions follow the source: each output file and folder gets what the umask gives a new one, narrowed
to the source's own permission bits (:func:`follow_source_modes`): a private 0700 folder of 0600 files
converts to a 0700 folder of 0600 files, never to 0755 / 0644.

``--force`` replaces only what dtypelab could have written: a ``.safetensors`` file, or a folder holding
nothing but a checkpoint's own files (:data:`CHECKPOINT_FILES`); any other file is named and the
replacement refused, unless ``force`` is :data:`FORCE_ANYTHING` (``--force --force``).
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import fnmatch
import functools
import operator
import os
import re
import secrets
import shutil
import stat
from dataclasses import dataclass
from pathlib import Path

from ..errors import CheckpointError
from ..report import Table, TableMixin

LOCK_NAME = ".dtypelab-staging.lock"
"""The liveness marker inside a staging folder: locked by its run for as long as the run lives."""

CHECKPOINT_FILES = ("*.safetensors", "*.safetensors.index.json", "*.json", "*.gguf", "tokenizer.model",
                    "*.tiktoken", "merges.txt", "vocab.txt", "spiece.model", "*.jinja", "README.md",
                    "LICENSE*", ".gitattributes")
"""What a Hugging Face checkpoint folder holds (and what convert writes or copies): ``--force`` may
replace a folder of only these; anything else in it is the user's and is named."""

FORCE_ANYTHING = 2
"""``force`` at this level (``--force --force``) replaces a destination whatever it holds."""


class StagedOutput:
    """A temporary folder beside the destination, renamed into place by :meth:`commit`, else removed.

    ``source``: the file or folder the output is made from; its permission bits bound the output's
    (:func:`follow_source_modes`). None leaves the umask's.
    """

    def __init__(self, dst: Path, force: bool, source: Path | None = None):
        self.dst, self.force, self.source = dst, force, source
        self.tmp = dst.parent / f".{dst.name}.dtypelab-tmp-{os.getpid()}-{secrets.token_hex(4)}"
        self.committed = False
        self._lock: int | None = None

    def __enter__(self) -> StagedOutput:
        self.dst.parent.mkdir(parents=True, exist_ok=True)
        remove_leftovers(self.dst)
        if self.dst.exists() and not self.force:
            raise CheckpointError(f"{self.dst}: already exists: choose another output or pass --force")
        if self.dst.exists() and self.force < FORCE_ANYTHING:
            _check_replaceable(self.dst)
        self._found = _identity(self.dst)  # what the destination was when this run started
        self.tmp.mkdir(mode=_staging_mode(self.source))
        self._lock = hold_lock(self.tmp / LOCK_NAME)
        return self

    def commit(self, dst_is_file: bool, durable: bool = False) -> None:
        """Rename the staged output into place. ``durable`` first flushes every staged file and folder
        to disk (fsync), and the parent folder after the rename, so that a power loss too leaves either
        the old destination or the complete new one: a rename can reach the disk before the data."""
        staged = self.tmp / self.dst.name if dst_is_file else self.tmp
        old = self.dst.parent / f".{self.dst.name}.dtypelab-old-{os.getpid()}-{secrets.token_hex(4)}"
        (self.tmp / LOCK_NAME).unlink()  # not part of the output; the pid in the name covers the rename
        if self.source is not None:
            follow_source_modes(staged, self.source)
        if durable:
            _sync_tree(self.tmp)
        if self.dst.exists() or self.dst.is_symlink():
            self._refuse_newcomer()
            os.rename(self.dst, old)
        try:
            _rename_no_replace(staged, self.dst)
        except FileExistsError:  # appeared between the check and the rename
            raise self._appeared() from None
        if durable:
            _sync(self.dst.parent)
        self.committed = True
        _remove(old)
        _remove(self.tmp)

    def _refuse_newcomer(self) -> None:
        """Without ``force``, a destination that is not the one found at the start is another writer's."""
        if not self.force and _identity(self.dst) != self._found:
            raise self._appeared()

    def _appeared(self) -> CheckpointError:
        return CheckpointError(f"{self.dst}: appeared while this conversion ran (another writer?) and was "
                               "kept; nothing of this run was written: choose another output or pass --force")

    def __exit__(self, exc_type, exc, traceback) -> None:
        if not self.committed:
            _remove(self.tmp)
        if self._lock is not None:
            os.close(self._lock)  # releases the lock
            self._lock = None
        if isinstance(exc, CheckpointError) and str(self.tmp) in str(exc):  # name what the user gave
            message = str(exc).replace(str(self.tmp / self.dst.name), str(self.dst))  # a file output
            exc.args = (message.replace(str(self.tmp), str(self.dst)),)


def _identity(path: Path) -> tuple[int, int] | None:
    """(device, inode) of ``path`` itself (a symlink is not followed), None when nothing is there."""
    try:
        found = os.lstat(path)
    except FileNotFoundError:
        return None
    return found.st_dev, found.st_ino


_RENAME_NOREPLACE = 1
_AT_FDCWD = -100


def _rename_no_replace(src: Path, dst: Path) -> None:
    """Rename ``src`` to ``dst``, raising FileExistsError rather than replacing anything at ``dst`` (even
    an empty folder, which a plain ``rename`` replaces silently). Atomic where the kernel and file system
    offer ``renameat2(RENAME_NOREPLACE)``; elsewhere a check immediately before ``rename``."""
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is not None:
        if renameat2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), _RENAME_NOREPLACE) == 0:
            return
        code = ctypes.get_errno()
        if code not in (errno.ENOSYS, errno.EINVAL):  # EINVAL: this file system lacks the flag
            raise OSError(code, os.strerror(code), str(dst))  # EEXIST makes a FileExistsError
    if os.path.lexists(dst):
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(dst))
    os.rename(src, dst)


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
"""The files whose permission bits an output's weights follow (pickles: what --allow-pickle converts)."""


def follow_source_modes(output: Path, source: Path) -> None:
    """Give every file and folder of ``output`` (a file, or a folder and what it holds) the mode the
    umask gives a new one (0666 / 0777 less the umask) narrowed to its source's permission bits: the
    file or folder of the same relative path in ``source`` where there is one, else the source's weights
    (the bits every weights file of :data:`WEIGHT_SUFFIXES` has in common: safetensors, or the pickles a
    ``--allow-pickle`` conversion read) or, for a folder, the source folder. So an output is
    never readable by more users than its source was, and otherwise is what any new file would be."""
    umask = current_umask()
    file_bits, folder_bits = 0o666 & ~umask, 0o777 & ~umask
    weights = ([_mode(p) for p in source.iterdir() if p.suffix in WEIGHT_SUFFIXES and p.is_file()]
               if source.is_dir() else [_mode(source)])
    weights_bits = functools.reduce(operator.and_, weights, 0o777)
    if output.is_file():
        os.chmod(output, file_bits & weights_bits)
        return
    root_bits = _mode(source) if source.is_dir() else folder_bits
    for path in sorted(output.rglob("*"), key=lambda p: -len(p.parts)) + [output]:
        if path.is_symlink():
            continue
        relative = path.relative_to(output)
        counterpart = source / relative if source.is_dir() else None
        if path.is_dir():
            bound = _mode(counterpart) if counterpart is not None and counterpart.is_dir() else root_bits
            os.chmod(path, folder_bits & bound)
        else:
            bound = _mode(counterpart) if counterpart is not None and counterpart.is_file() else weights_bits
            os.chmod(path, file_bits & bound)


def _staging_mode(source: Path | None) -> int:
    """The staging folder's mode: a private source's is private from the start, not only once
    committed (a file source's read bits give the folder's search bits: 0600 -> 0700)."""
    if source is None:
        return 0o777
    bits = _mode(source)
    return 0o700 | bits | (0 if source.is_dir() else (bits & 0o444) >> 2)


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def current_umask() -> int:
    """This process's umask, read without changing it (``/proc/self/status``; elsewhere set and restored
    at once, which other threads could briefly see)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


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


def _check_replaceable(path: Path) -> None:
    """Refuse to let ``--force`` delete anything dtypelab could not have written, naming it."""
    if path.is_symlink() or not path.is_dir():
        if path.suffix == ".safetensors":
            return
        raise CheckpointError(f"{path}: --force replaces only a checkpoint (a .safetensors file, or a folder "
                              "of a checkpoint's files), and this is another file: choose another output, "
                              "or pass --force twice to replace it")
    others = [p.relative_to(path).as_posix() for p in sorted(path.rglob("*"))
              if not p.is_dir() and not _checkpoint_file(p.name)]
    if others:
        shown = ", ".join(others[:5]) + (f" and {len(others) - 5} more" if len(others) > 5 else "")
        raise CheckpointError(f"{path}: --force replaces only a checkpoint's own files, and this folder also "
                              f"holds {shown}: move them, choose another output, or pass --force twice to "
                              "replace it all")


def _checkpoint_file(name: str) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in CHECKPOINT_FILES)


def hold_lock(path: Path) -> int:
    """Create ``path`` and lock it (``flock``, exclusive) for as long as the returned descriptor is open
    (the process's life at most): the liveness marker of a staging folder."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def lock_is_held(path: Path) -> bool:
    """Whether a live process holds the lock file ``path`` (False when nobody does or it is gone)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing drops a lock taken here
    return False


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


@dataclass(frozen=True)
class Leftover:
    """A staging folder (or an old destination set aside during a rename) beside a conversion's output.

    ``stale``: its run is gone (nobody holds its lock; without a lock, its process id is gone), so it
    can be removed; a live one belongs to a conversion still running. ``nbytes``: what it holds."""

    path: Path
    stale: bool
    nbytes: int


def find_leftovers(folder: str | os.PathLike) -> list[Leftover]:
    """Every staging folder dtypelab left in ``folder`` (``.NAME.dtypelab-tmp-PID-HEX`` or ``-old-``),
    live or stale, sorted by name."""
    folder = Path(folder)
    found = []
    for path in sorted(folder.glob(".*.dtypelab-*-*-*")) if folder.is_dir() else []:
        match = re.search(r"\.dtypelab-(?:tmp|old)-(\d+)-[0-9a-f]+$", path.name)
        if match:
            found.append(Leftover(path, _stale(path, int(match.group(1))), _nbytes(path)))
    return found


@dataclass
class LeftoverReport(TableMixin):
    """What :func:`clean_leftovers` found in ``folder``: every leftover, and whether the stale ones were
    removed (``removed`` False: only listed, ``dtypelab clean --dry-run``)."""

    folder: Path
    leftovers: list[Leftover]
    removed: bool

    def to_table(self) -> Table:
        done = "removed" if self.removed else "stale (would be removed)"
        rows = [[lo.path.name, done if lo.stale else "live: a conversion is running", lo.nbytes]
                for lo in self.leftovers]
        freed = sum(lo.nbytes for lo in self.leftovers if lo.stale)
        notes = [f"{self.folder}: {len(rows)} leftover(s); {freed:,} bytes "
                 f"{'freed' if self.removed else 'would be freed'}; live ones are never touched"]
        return Table("Staging folders of conversions", ["folder", "state", "bytes"], rows, notes)


def clean_leftovers(folder: str | os.PathLike, dry_run: bool = False) -> LeftoverReport:
    """List the staging folders conversions left in ``folder`` and remove the stale ones (all of them
    unless ``dry_run``); a live conversion's folder is listed, never touched."""
    leftovers = find_leftovers(folder)
    if not dry_run:
        for leftover in leftovers:
            if leftover.stale:
                _remove(leftover.path)
    return LeftoverReport(Path(folder), leftovers, not dry_run)


def remove_leftovers(dst: str | os.PathLike) -> list[Path]:
    """Remove the staging folders that killed conversions left beside ``dst`` (in its parent folder,
    whatever destination they were for).

    A staging folder whose lock file (:data:`LOCK_NAME`) no process holds is stale; one without a lock
    file is stale when the process id in its name is gone. A live run's folder is never touched.

    Returns:
        The paths removed.
    """
    removed = []
    for leftover in find_leftovers(Path(dst).parent):
        if leftover.stale:
            _remove(leftover.path)
            removed.append(leftover.path)
    return removed


def _nbytes(path: Path) -> int:
    if path.is_symlink() or not path.is_dir():
        return path.lstat().st_size
    return sum(p.lstat().st_size for p in path.rglob("*") if not p.is_dir())


def _stale(folder: Path, pid: int) -> bool:
    lock = folder / LOCK_NAME
    if folder.is_dir() and not folder.is_symlink() and lock.exists():
        return not lock_is_held(lock)
    return not _process_alive(pid)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
