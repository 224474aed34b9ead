"""Turning what a user types into model inputs, with errors that say what would work."""

from __future__ import annotations

import json

import torch

from .errors import InputError


def parse_token_ids(text: str) -> torch.Tensor:
    """Parse ``"[[1, 0, 1]]"`` (a JSON list of lists of ints) into a ``(batch, seq)`` LongTensor.

    A flat list ``"[1, 0, 1]"`` is taken as one sequence.

    Example:
        >>> parse_token_ids("[[1,0,1]]").shape
        torch.Size([1, 3])
    """
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(f"malformed --input {text!r} ({exc.msg}): write token ids as JSON, "
                         "e.g. '[[1, 0, 1]]'") from exc
    rows = value if value and isinstance(value, list) and isinstance(value[0], list) else [value]
    if not _is_int_matrix(rows):
        raise InputError(f"malformed --input {text!r}: expected a non-empty list of equal-length lists "
                         "of integers, e.g. '[[1, 0, 1]]'")
    return torch.tensor(rows, dtype=torch.long)


def _is_int_matrix(rows: object) -> bool:
    if not isinstance(rows, list) or not rows or not all(isinstance(r, list) and r for r in rows):
        return False
    if len({len(r) for r in rows}) != 1:
        return False
    return all(isinstance(v, int) and not isinstance(v, bool) for r in rows for v in r)
