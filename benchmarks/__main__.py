"""``make bench``: run every ``benchmarks/bench_*.py`` module's ``run()`` and print its table.

A benchmark that fails becomes a line with its reason; the others still run.
"""

from __future__ import annotations

import importlib
import pkgutil
import platform
import sys
from pathlib import Path

import torch

from .harness import print_table


def main(selected: list[str]) -> None:
    print(f"machine: {platform.machine()} {platform.processor() or ''}, python {platform.python_version()}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    found = pkgutil.iter_modules([str(Path(__file__).parent)])
    names = sorted(m.name for m in found if m.name.startswith("bench_"))
    for name in names:
        if selected and not any(s in name for s in selected):
            continue
        try:
            print_table(importlib.import_module(f"benchmarks.{name}").run())
        except Exception as exc:  # one broken benchmark must not hide the others
            print(f"{name}: FAILED ({type(exc).__name__}: {exc})\n", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
