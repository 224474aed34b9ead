"""Helpers shared by test modules (tests/ is on sys.path under pytest's default import mode)."""

import pytest

from dtypelab.cli import main


def run_cli(capsys, *argv):
    """Run ``dtypelab ARGV`` in-process (paths and numbers become strings); return (exit code, stdout,
    stderr)."""
    with pytest.raises(SystemExit) as exit_info:
        main([str(arg) for arg in argv])
        raise SystemExit(0)
    out, err = capsys.readouterr()
    return exit_info.value.code or 0, out, err


def corrupt_tensor_writes(monkeypatch) -> None:
    """Make the converter's writes flip the last bit of every tensor chunk (a disk that lies), so that
    ``--verify`` has something to catch."""
    import dtypelab.checkpoint.writer as writer

    real_write = writer.write_all

    def corrupting_write(fd, view, path):
        data = bytearray(view)
        if len(data) > 1000:  # tensor data, not the header
            data[-1] ^= 1
        real_write(fd, memoryview(data), path)

    monkeypatch.setattr(writer, "write_all", corrupting_write)
