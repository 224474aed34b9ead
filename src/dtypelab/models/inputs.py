"""Turning what a user types into model inputs, with errors that say what would work.

Models stage: builds on :mod:`dtypelab.models.loading` (a loaded model's tokenizer, device, vocabulary).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Sequence
from importlib import resources
from pathlib import Path

import torch

from ..errors import InputError
from .builtins import BUILTIN_MODELS
from .loading import LoadedModel, device_errors, validate_token_ids
from .texts import DEFAULT_CTX, TEXT_SETS, text_set, token_windows


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
    try:
        return torch.tensor(rows, dtype=torch.long)
    except (OverflowError, RuntimeError, ValueError) as exc:  # an id past int64
        raise InputError(f"token id out of range in --input {text!r}: ids are vocabulary indices, "
                         "e.g. '[[1, 0, 1]]'") from exc


def _is_int_matrix(rows: object) -> bool:
    if not isinstance(rows, list) or not rows or not all(isinstance(r, list) and r for r in rows):
        return False
    if len({len(r) for r in rows}) != 1:
        return False
    return all(isinstance(v, int) and not isinstance(v, bool) for r in rows for v in r)


# ---------------------------------------------------------------------------------------------------
# Text, tensor files and the bundled default sentences.

DEFAULT_TEXTS_FILE = "sentences.txt"
TENSOR_SUFFIXES = (".safetensors", ".npy")


def default_texts() -> list[str]:
    """The 64 varied English sentences bundled with dtypelab (``dtypelab/data/sentences.txt``), used
    when a model with a tokenizer is given no input."""
    text = resources.files("dtypelab").joinpath("data", DEFAULT_TEXTS_FILE).read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()]


def read_text_file(path: str | Path) -> list[str]:
    """One text per non-empty line of a UTF-8 file."""
    path = Path(path)
    try:
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read --text-file {path} ({exc}): give a UTF-8 text file, one text per line"
                         ) from exc
    if not lines:
        raise InputError(f"--text-file {path} holds no text: write one sentence per line")
    return lines


def tokenize(tokenizer: object, texts: Sequence[str],
             max_length: int | None = None) -> dict[str, torch.Tensor]:
    """Tokenise a batch with the model's own tokenizer, padded to the longest text.

    Returns:
        ``input_ids`` (batch, seq) and ``attention_mask`` (batch, seq; 0 on padding), plus whatever
        else the tokenizer produces (``token_type_ids``). Texts longer than ``max_length`` tokens are
        truncated to what the model accepts.
    """
    texts = [texts] if isinstance(texts, str) else list(texts)  # one str is one text, not its letters
    if not texts:
        raise InputError("no text given: pass --text 'a sentence' or --text-file FILE")
    with _padding_token(tokenizer):
        encoded = tokenizer(texts, padding=True, truncation=max_length is not None,
                            max_length=max_length, return_tensors="pt")
    return dict(encoded)


@contextlib.contextmanager
def _padding_token(tokenizer: object) -> Iterator[None]:
    """Tokenizers without a pad token (GPT-2's) pad with their end-of-sequence token for this call;
    ``attention_mask`` hides it from every metric either way."""
    if getattr(tokenizer, "pad_token", None) is not None:
        yield
        return
    if getattr(tokenizer, "eos_token", None) is None:
        raise InputError("the model's tokenizer has neither a padding nor an end-of-sequence token, so "
                         "texts cannot be batched: give token ids with --input '[[1, 2, 3]]'")
    tokenizer.pad_token = tokenizer.eos_token
    try:
        yield
    finally:
        tokenizer.pad_token = None


def load_tensor_file(path: str | Path) -> torch.Tensor | dict[str, torch.Tensor]:
    """Inputs saved as tensors: a ``.npy`` array, or a ``.safetensors`` file (one tensor is returned
    as is; several become keyword arguments by name, e.g. ``input_ids`` and ``attention_mask``).
    Integers are read as int64 and floats as float32 (see :func:`_as_input`)."""
    path = Path(path)
    if path.suffix not in TENSOR_SUFFIXES:
        raise InputError(f"cannot read inputs from {path}: use a .safetensors or .npy file, "
                         "or token ids as JSON with --input")
    if not path.is_file():
        raise InputError(f"no such input file {path}: check the path")
    tensors = _read_npy(path) if path.suffix == ".npy" else _read_safetensors(path)
    tensors = {name: _as_input(tensor) for name, tensor in tensors.items()}
    return next(iter(tensors.values())) if len(tensors) == 1 else tensors


def _as_input(tensor: torch.Tensor) -> torch.Tensor:
    """Integers as int64 (ids, masks), floats as float32 (the reference's dtype: a float64 .npy would
    not run), booleans as they are."""
    if tensor.dtype == torch.bool:
        return tensor
    return tensor.float() if tensor.is_floating_point() else tensor.long()


def _read_npy(path: Path) -> dict[str, torch.Tensor]:
    import numpy as np

    try:
        return {"input": torch.from_numpy(np.load(path, allow_pickle=False))}
    except (ValueError, OSError, TypeError) as exc:  # TypeError: a dtype torch lacks (strings ...)
        raise InputError(f"cannot read {path} as a numeric .npy array ({exc}): save it with numpy.save "
                         "from a numeric array") from exc


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path))
    except SafetensorError as exc:
        raise InputError(f"corrupt or truncated safetensors input {path} ({exc}): re-save it") from exc
    if not tensors:
        raise InputError(f"{path} holds no tensors: save the model inputs into it")
    return tensors


def model_inputs(loaded: LoadedModel, *, texts: Sequence[str] = (), text_file: str | Path | None = None,
                 input_ids: str | None = None, tensor_file: str | Path | None = None,
                 text_set: str | None = None, ctx: int | None = None, stride: int | None = None,
                 windows: int | None = None) -> torch.Tensor | dict[str, torch.Tensor]:
    """The inputs for one forward pass of ``loaded``, from whichever single source the user gave.

    Args:
        texts: sentences, tokenised with the model's tokenizer (padding masked by ``attention_mask``).
        text_file: a file of sentences, one per line.
        input_ids: token ids as JSON, e.g. ``"[[1, 0, 1]]"``.
        tensor_file: a ``.safetensors`` / ``.npy`` file of input tensors.
        text_set: ``"evaluation"`` or ``"calibration"``: that part of the standard library's
            documentation prose (:mod:`dtypelab.models.texts`), cut into windows of ``ctx`` tokens.
        ctx: tokens per window (default 512); at most the model's ``max_length``.
        stride: tokens between window starts (default ``ctx``: non-overlapping).
        windows: keep only the first this many windows (default: every full window of the text), as
            llama.cpp's ``--chunks``: a quicker, noisier measurement.

    With no source: the built-in's default text set (when it has one), the model's default ids
    (``dummy``) or the bundled sentences (models with a tokenizer). Token ids given as one flat sequence
    become a batch of one, ``(1, seq)``. ``ctx``, ``stride`` and ``windows`` apply to text sets only:
    given without one (a ``text_set`` or a built-in whose default is one) they are refused rather than
    ignored.

    Returns:
        A tensor for plain modules, keyword arguments for Hugging Face models, on the model's device.
    """
    raw = _inputs_from(loaded, texts, text_file, input_ids, tensor_file, text_set, ctx, stride, windows)
    return to_device(raw, loaded.device)


def _inputs_from(loaded: LoadedModel, texts: Sequence[str], text_file: str | Path | None,
                 input_ids: str | None, tensor_file: str | Path | None, chosen_set: str | None,
                 ctx: int | None, stride: int | None, windows: int | None
                 ) -> torch.Tensor | dict[str, torch.Tensor]:
    given = [name for name, value in [("--text", texts), ("--text-file", text_file), ("--input", input_ids),
                                      ("--input-file", tensor_file), ("--text-set", chosen_set)] if value]
    if len(given) > 1:
        raise InputError(f"several inputs given ({', '.join(given)}): choose one")
    entry = BUILTIN_MODELS.get(loaded.spec)
    chosen_set = chosen_set or (entry.text_set if entry is not None and not given else None)
    if chosen_set is None and (ctx is not None or stride is not None or windows is not None):
        raise InputError("--ctx, --stride and --windows need --text-set: add --text-set "
                         f"{' or '.join(TEXT_SETS)}")
    if chosen_set is not None:
        return _text_set_inputs(loaded, chosen_set, DEFAULT_CTX if ctx is None else ctx, stride, windows)
    if texts or text_file:
        return _text_inputs(loaded, texts or read_text_file(text_file))
    if input_ids is not None or tensor_file is not None:
        raw = parse_token_ids(input_ids) if input_ids is not None else load_tensor_file(tensor_file)
        return _id_inputs(loaded, raw)
    if loaded.default_input is not None:
        return _id_inputs(loaded, loaded.default_input)
    if loaded.tokenizer is not None:
        return _text_inputs(loaded, default_texts())
    raise InputError(f"model {loaded.spec!r} has no default input: give token ids with --input '[[1, 2, 3]]'")


def _text_set_inputs(loaded: LoadedModel, name: str, ctx: int, stride: int | None,
                     windows: int | None) -> dict[str, torch.Tensor]:
    text = text_set(name)  # an unknown name is refused before the tokenizer is asked for
    if loaded.tokenizer is None:
        raise InputError(f"model {loaded.spec!r} has no tokenizer, so it cannot read --text-set {name}: give "
                         "token ids with --input '[[1, 0, 1]]' or a tensor file with --input-file")
    cut = token_windows(loaded.tokenizer, text, ctx, stride, max_length=loaded.max_length, windows=windows)
    validate_token_ids(loaded.model, cut["input_ids"])
    return cut


def _text_inputs(loaded: LoadedModel, texts: Sequence[str]) -> dict[str, torch.Tensor]:
    if loaded.tokenizer is None:
        raise InputError(f"model {loaded.spec!r} has no tokenizer, so it cannot read text: give token ids "
                         "with --input '[[1, 0, 1]]' or a tensor file with --input-file")
    return tokenize(loaded.tokenizer, texts, loaded.max_length)


def _id_inputs(loaded: LoadedModel, raw: torch.Tensor | dict[str, torch.Tensor]
               ) -> torch.Tensor | dict[str, torch.Tensor]:
    if isinstance(raw, torch.Tensor) and raw.dim() == 1 and not raw.is_floating_point():
        raw = raw.unsqueeze(0)  # one sequence of ids -> (1, seq), as parse_token_ids reads a flat list
    ids = raw.get("input_ids") if isinstance(raw, dict) else raw
    if ids is not None and not ids.is_floating_point():
        validate_token_ids(loaded.model, ids)
    if isinstance(raw, dict) or loaded.kind == "module":
        return raw
    if raw.is_floating_point():
        _check_embeddings(loaded, raw)
        return {"inputs_embeds": raw}
    if raw.dim() != 2:
        raise InputError(f"token ids must be a (batch, sequence) matrix, not shape {list(raw.shape)}: "
                         "save them as a 2-D integer array")
    return {"input_ids": raw, "attention_mask": torch.ones_like(raw)}


def _check_embeddings(loaded: LoadedModel, raw: torch.Tensor) -> None:
    """Floats for a Hugging Face model are ``inputs_embeds``: (batch, sequence, hidden), refused here
    in one line rather than by the forward's shape error."""
    table = loaded.model.get_input_embeddings() if hasattr(loaded.model, "get_input_embeddings") else None
    hidden = getattr(table, "embedding_dim", None)
    if raw.dim() != 3 or (hidden is not None and raw.shape[-1] != hidden):
        raise InputError(f"floating inputs of shape {list(raw.shape)} cannot feed {loaded.spec!r}: floats "
                         f"are read as inputs_embeds (batch, sequence, {hidden or 'hidden'}); token ids must "
                         "be integers (numpy int64)")


def to_device(inputs: torch.Tensor | dict[str, torch.Tensor], device: torch.device | str
              ) -> torch.Tensor | dict[str, torch.Tensor]:
    """Move a tensor or every tensor of a keyword-argument mapping to ``device``.

    Raises:
        InputError: a device torch does not know or cannot reach.
    """
    with device_errors(device, "the inputs"):
        if isinstance(inputs, torch.Tensor):
            return inputs.to(device)
        return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
