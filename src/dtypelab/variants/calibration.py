"""Calibration inputs for ``:gptq`` / ``:awq`` formats: the bundled calibration text, or a file.

Variants stage: builds on :mod:`dtypelab.models` (tokenizer, text sets, tensor files). The algorithms and
the block-by-block pipeline are :mod:`dtypelab.quant.calibrate`, below ``models/``; it takes tokenised
batches, and this module makes them: the calibration part of :mod:`dtypelab.models.texts` (never the
held-out evaluation part the metrics are measured on) or ``--calib-file``, cut into windows of ``ctx``
tokens, at most ``tokens`` of them in all, in batches of :data:`BATCH_WINDOWS` windows.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import InputError
from ..models import LoadedModel, ModelKind, calibration_text, model_inputs, token_windows, validate_token_ids
from ..quant.calibrate import batch_tokens
from .defaults import DEFAULT_CALIB_TOKENS

DEFAULT_CALIB_CTX = 512
BATCH_WINDOWS = 4  # windows per forward: one block's activations for 4 x 512 tokens stay a few MB
TENSOR_SUFFIXES = (".safetensors", ".npy")


@dataclass
class CalibrationData:
    """Tokenised calibration batches and where they came from, recorded in outputs and ``--json``.

    Args:
        batches: model inputs (keyword dicts, or tensors for plain modules), ``BATCH_WINDOWS`` windows each.
        source: ``"calibration text"`` (the bundled one) or the file read.
        tokens: tokens in all batches.
        ctx: tokens per window (0 for a tensor file's own shape).
        threads: torch's intra-op threads when they were cut (codes are bit-identical for the same
            text, settings and thread count).
    """

    batches: list = field(repr=False)
    source: str
    tokens: int
    ctx: int
    threads: int

    def settings(self) -> dict:
        return {"source": self.source, "tokens": self.tokens, "ctx": self.ctx, "threads": self.threads}


def calibration_data(loaded: LoadedModel, calib_file: str | os.PathLike | None = None,
                     calib_tokens: int = DEFAULT_CALIB_TOKENS, ctx: int | None = None) -> CalibrationData:
    """Calibration batches for ``loaded``: ``calib_file`` (a UTF-8 text, or ``.safetensors`` / ``.npy``
    input tensors) or the bundled calibration text, at most ``calib_tokens`` tokens.

    Raises:
        InputError: ``calib_tokens`` below one window, a text shorter than asked for, a model with no
            tokenizer and no tensor file, an unreadable file.
    """
    if calib_tokens < 2:
        raise InputError(f"--calib-tokens {calib_tokens} is too few: give at least one window (e.g. 512)")
    path = Path(calib_file) if calib_file is not None else None
    if path is not None and path.suffix in TENSOR_SUFFIXES:
        inputs, ctx_used = _tensor_inputs(loaded, path, calib_tokens), 0
    else:
        ctx_used = min(ctx or DEFAULT_CALIB_CTX, loaded.max_length or DEFAULT_CALIB_CTX, calib_tokens)
        inputs = _text_inputs(loaded, path, calib_tokens, ctx_used)
    batches = _batches(inputs)
    source = str(path) if path is not None else "calibration text"
    return CalibrationData(batches, source, batch_tokens(batches), ctx_used, torch.get_num_threads())


def _text_inputs(loaded: LoadedModel, path: Path | None, tokens: int, ctx: int) -> dict[str, torch.Tensor]:
    """Windows of ``ctx`` tokens from the text, ``tokens // ctx`` of them (all must be there)."""
    what = f"--calib-file {path}" if path is not None else "the bundled calibration text"
    if loaded.tokenizer is None:
        raise InputError(f"model {loaded.spec!r} has no tokenizer, so it cannot read {what}: give token ids "
                         "as a .safetensors or .npy --calib-file")
    text = _read_text(path) if path is not None else calibration_text()
    prefix, suffix = _special_tokens(loaded)
    cut = token_windows(loaded.tokenizer, text, ctx - len(prefix) - len(suffix), max_length=loaded.max_length)
    wanted = max(1, tokens // ctx)
    if len(cut["input_ids"]) < wanted:
        held = len(cut["input_ids"]) * ctx
        raise InputError(f"{what} holds {held} tokens in windows of {ctx}, fewer than --calib-tokens "
                         f"{tokens}: use --calib-tokens {held} or less, or a longer --calib-file")
    ids = cut["input_ids"][:wanted].contiguous()
    if prefix or suffix:  # an encoder reads [CLS] text [SEP]: its activations there are part of its work
        rows = len(ids)
        ids = torch.cat([torch.tensor([prefix] * rows, dtype=torch.long).reshape(rows, -1), ids,
                         torch.tensor([suffix] * rows, dtype=torch.long).reshape(rows, -1)], dim=1)
    validate_token_ids(loaded.model, ids)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _special_tokens(loaded: LoadedModel) -> tuple[list[int], list[int]]:
    """(prefix, suffix): the special tokens the tokenizer wraps a text in, for models that are not causal
    LMs (an encoder is always fed ``[CLS] ... [SEP]``, as its inputs are tokenised), found by tokenising a
    probe with and without them; none for causal LMs, whose text windows carry none (nor do the
    evaluation windows)."""
    if loaded.kind == ModelKind.CAUSAL_LM:
        return [], []
    tokenizer = loaded.tokenizer
    wrapped = list(tokenizer("a", verbose=False)["input_ids"])
    plain = list(tokenizer("a", add_special_tokens=False, verbose=False)["input_ids"])
    for start in range(len(wrapped) - len(plain) + 1):
        if wrapped[start:start + len(plain)] == plain:
            return wrapped[:start], wrapped[start + len(plain):]
    return [], []


def _read_text(path: Path) -> str:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read --calib-file {path} ({exc}): give a UTF-8 text file, or a "
                         ".safetensors / .npy file of input tensors") from exc
    if not text.strip():
        raise InputError(f"--calib-file {path} holds no text: give a longer text")
    return text


def _tensor_inputs(loaded: LoadedModel, path: Path, tokens: int):
    """A tensor file's inputs (as ``--input-file`` reads them), its first rows up to ``tokens``."""
    inputs = model_inputs(loaded, tensor_file=path)
    first = inputs if isinstance(inputs, torch.Tensor) else next(iter(inputs.values()))
    per_row = int(first[0].numel()) if first.dim() > 1 else 1
    rows = max(1, tokens // max(per_row, 1))
    if isinstance(inputs, torch.Tensor):
        return inputs[:rows]
    return {name: value[:rows] if isinstance(value, torch.Tensor) else value
            for name, value in inputs.items()}


def _batches(inputs) -> list:
    """``inputs`` split along the batch dimension, ``BATCH_WINDOWS`` rows at a time."""
    if isinstance(inputs, torch.Tensor):
        return list(inputs.split(BATCH_WINDOWS))
    rows = next(iter(inputs.values())).shape[0]
    return [{name: value[start:start + BATCH_WINDOWS] if isinstance(value, torch.Tensor) else value
             for name, value in inputs.items()} for start in range(0, rows, BATCH_WINDOWS)]

