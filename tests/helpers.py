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
