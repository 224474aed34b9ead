"""Small builders of hostile files shared by the tests in tests/hostile."""

from __future__ import annotations

import json
from pathlib import Path


def edit_json(path: Path, **changes) -> None:
    """Set top-level keys of a JSON file."""
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def nested(depth: int) -> str:
    """A JSON value nested ``depth`` lists deep."""
    return "[" * depth + "]" * depth
