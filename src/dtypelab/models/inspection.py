"""``inspect``: what a model spec holds, whether it can run or is only weights.

Models stage: a loadable model is loaded and measured with :func:`~dtypelab.quant.inspect_model`; a bare
``.safetensors`` file or a weights folder without config.json is read from its headers only
(:func:`~dtypelab.checkpoint.inspect_checkpoint`), a ``.gguf`` file (or a folder holding one, without
config.json or safetensors) from its GGUF header (:func:`~dtypelab.checkpoint.inspect_gguf`); a pickled
state dict only with ``allow_pickle``.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from ..checkpoint import CheckpointInspection, GgufInspection, inspect_checkpoint, inspect_gguf, stored_nbytes
from ..quant import ModelInspection, inspect_model, inspect_tensors
from .loading import PICKLE_SUFFIXES, folder_weights, gguf_in, load, load_state_dict_file, pickle_refused


def bare_checkpoint_path(spec: str) -> Path | None:
    """The path when ``spec`` is a bare ``.safetensors`` file or a folder of safetensors weights without
    ``config.json`` (inspectable from headers, not runnable); None otherwise."""
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".safetensors":
        return path
    if path.is_dir() and not (path / "config.json").is_file() and folder_weights(path)[0]:
        return path
    return None


def gguf_file_path(spec: str) -> Path | None:
    """The ``.gguf`` file ``spec`` names: the file itself, or the one ``.gguf`` of a folder that has no
    ``config.json`` and no safetensors weights; None otherwise.

    Raises:
        ModelSpecError: a folder without config.json or safetensors holding several ``.gguf`` files.
    """
    return gguf_in(Path(spec).expanduser())


def inspect(spec: str, dtype: str | torch.dtype = "auto", *,
            allow_pickle: bool = False) -> ModelInspection | CheckpointInspection | GgufInspection:
    """What a model or checkpoint holds: dtypes, bytes per dtype, footprint, shared storage.

    A loadable model (see :func:`load`) is loaded in ``dtype`` and inspected with
    :func:`~dtypelab.inspect_model`. A bare ``.safetensors`` file or a weights folder without
    ``config.json`` is read from its headers only (``dtypelab.checkpoint.inspect_checkpoint``). A
    pickled state dict is read with ``torch.load(weights_only=True)`` when ``allow_pickle`` is set. A
    ``.gguf`` file, or a folder holding one without config.json or safetensors, is read from its GGUF
    header only (``dtypelab.checkpoint.inspect_gguf``: GGML types, bytes, bits per weight; ``dtype``
    does not apply).
    """
    gguf = gguf_file_path(spec)
    if gguf is not None:
        return inspect_gguf(gguf)
    bare = bare_checkpoint_path(spec)
    if bare is not None:
        return _inspect_bare_checkpoint(bare)
    pickles = _bare_pickles(Path(spec).expanduser())
    if pickles:
        if not allow_pickle:
            raise pickle_refused(pickles[0])
        return inspect_tensors((name, "tensor", tensor) for file in pickles
                               for name, tensor in load_state_dict_file(file).items())
    model = load(spec, dtype, allow_pickle=allow_pickle).model
    return replace(inspect_model(model), stored_bytes=stored_nbytes(model))


def _bare_pickles(path: Path) -> list[Path]:
    """A pickled state dict file, or the pickle weight files of a folder without ``config.json``."""
    if path.is_file() and path.suffix in PICKLE_SUFFIXES:
        return [path]
    if path.is_dir() and not (path / "config.json").is_file():
        return folder_weights(path)[1]
    return []


def _inspect_bare_checkpoint(path: Path) -> CheckpointInspection:
    return inspect_checkpoint(path)
