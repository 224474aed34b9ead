"""``make bench``: run every ``benchmarks/bench_*.py`` module's ``run()`` and print its table.

``python -m benchmarks NAME [NAME …]`` runs exactly the benchmarks named (``convert`` or
``bench_convert``: the module's name, with or without its ``bench_`` prefix; never a substring, so
``convert`` does not also run ``convert_quantized``). An unknown name is one line on stderr listing the
names, exit code 2, before anything runs. A benchmark that fails becomes a line with its reason; the
others still run.
"""

from __future__ import annotations

import importlib
import pkgutil
import platform
import sys
from pathlib import Path

import torch

from .harness import print_table

PREFIX = "bench_"
USAGE_EXIT = 2  # as the CLI's bad input


class UnknownBenchmark(ValueError):
    """A name on the command line that is no benchmark's."""


def main(selected: list[str]) -> int:
    try:
        names = select(available(), selected)
    except UnknownBenchmark as exc:
        print(f"python -m benchmarks: {exc}", file=sys.stderr)
        return USAGE_EXIT
    print(f"machine: {platform.machine()} {platform.processor() or ''}, python {platform.python_version()}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    for name in names:
        try:
            print_table(importlib.import_module(f"benchmarks.{name}").run())
        except Exception as exc:  # one broken benchmark must not hide the others
            print(f"{name}: FAILED ({type(exc).__name__}: {exc})\n", flush=True)
    return 0


def available() -> list[str]:
    """Module names of every benchmark (``bench_*.py`` beside this file), sorted."""
    found = pkgutil.iter_modules([str(Path(__file__).parent)])
    return sorted(m.name for m in found if m.name.startswith(PREFIX))


def select(names: list[str], selected: list[str]) -> list[str]:
    """The benchmarks to run, in ``names``' order: all of them when nothing is selected, else exactly the
    ones named (``convert`` = ``bench_convert``).

    Raises:
        UnknownBenchmark: a selected name that matches no benchmark exactly (the message lists them).
    """
    if not selected:
        return names
    wanted = {s if s.startswith(PREFIX) else PREFIX + s for s in selected}
    unknown = [s for s in selected if (s if s.startswith(PREFIX) else PREFIX + s) not in names]
    if unknown:
        listed = ", ".join(n.removeprefix(PREFIX) for n in names)
        raise UnknownBenchmark(f"no benchmark named {', '.join(unknown)}; the names are: {listed}")
    return [n for n in names if n in wanted]


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
