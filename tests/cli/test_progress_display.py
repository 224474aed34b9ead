"""The progress line: on a terminal's stderr only, cleared before the result, silenced by --quiet."""

from __future__ import annotations

import io
import os
import pty
import subprocess
import sys

from dtypelab.cli.progress import StatusLine, describe
from dtypelab.progress import ProgressEvent


def test_describe_names_the_stage_count_item_and_time():
    assert describe(ProgressEvent("compare", 2, 4, "variants", "int8"), 12.4) == \
        "compare: 2/4 variants  int8  12 s"
    assert describe(ProgressEvent("headroom", 1500, None, "module calls"), 3) == \
        "headroom: 1,500 module calls  3 s"
    assert describe(ProgressEvent("convert", 10**9, 2 * 10**9, "bytes"), 1) == "convert: 1.00/2.00 GB  1 s"


def test_the_line_fits_the_width_is_throttled_and_cleared():
    stream = io.StringIO()
    line = StatusLine(stream, width=30)
    line(ProgressEvent("layers", 1, 99, "modules", "encoder.layer.0.attention.self.query"))
    line(ProgressEvent("layers", 2, 99, "modules", "x"))  # within 0.2 s: not drawn
    line.close()
    drawn = stream.getvalue().split("\r")
    assert drawn[1] == "layers: 1/99 modules  encoder"[:29].ljust(29)
    assert drawn[2:] == [" " * 29, ""]  # cleared, cursor back at the start


def run_on_a_terminal(*argv: str) -> tuple[int, str, str]:
    """Run dtypelab with stderr on a pseudo-terminal (stdout piped, as `| tee` would)."""
    parent, child = pty.openpty()
    env = {k: v for k, v in os.environ.items() if k != "NO_PROGRESS"}
    done = subprocess.run([sys.executable, "-m", "dtypelab.cli", *argv], stdout=subprocess.PIPE, stderr=child,
                          text=True, timeout=300, env=env)
    os.close(child)
    err = b""
    while True:
        try:
            chunk = os.read(parent, 65536)
        except OSError:  # EIO: the terminal's other end is closed and drained
            break
        if not chunk:
            break
        err += chunk
    os.close(parent)
    return done.returncode, done.stdout, err.decode()


def test_compare_on_a_terminal_shows_progress_and_quiet_silences_it():
    code, out, err = run_on_a_terminal("compare", "tiny-llama", "--to", "bf16,int8", "--text", "Hello.")
    assert code == 0 and out.startswith("Comparison against the reference")
    assert "load: " in err and "compare: " in err and "variants" in err
    code, out, err = run_on_a_terminal("compare", "tiny-llama", "--to", "bf16", "--text", "Hello.", "--quiet")
    assert code == 0 and out.startswith("Comparison") and err == ""
