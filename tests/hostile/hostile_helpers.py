"""Small builders of hostile files shared by the tests in tests/hostile."""

from __future__ import annotations

import json
import os
from pathlib import Path

from hypothesis import HealthCheck, settings


def edit_json(path: Path, **changes) -> None:
    """Set top-level keys of a JSON file."""
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def nested(depth: int) -> str:
    """A JSON value nested ``depth`` lists deep."""
    return "[" * depth + "]" * depth


LONG_FUZZ = os.environ.get("HYPOTHESIS_PROFILE") == "long"
"""``HYPOTHESIS_PROFILE=long pytest tests/hostile -k fuzz``: 50x the examples, a fresh random seed per run
(the default run is derandomized: the same examples every time, so ``make test`` stays fast and stable)."""


def fuzz(examples: int) -> settings:
    """Hypothesis settings for one fuzz test: ``examples`` fixed examples by default, no deadline (the
    machine is shared; hangs are caught by each test's own time bound), no example database written.
    The examples of one test share its ``tmp_path`` and overwrite one file there (a folder per example
    from ``tmp_path_factory.mktemp`` costs time quadratic in the examples: it scans the numbered ones)."""
    return settings(max_examples=examples * 50 if LONG_FUZZ else examples, derandomize=not LONG_FUZZ,
                    deadline=None, database=None, print_blob=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.function_scoped_fixture])
