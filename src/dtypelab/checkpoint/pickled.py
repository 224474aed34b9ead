"""Pickled weights (``pytorch_model.bin``, ``.pt``): read only through ``torch.load(weights_only=True)``,
and only when the user opted in; written out as safetensors so that ``convert`` streams them like any
other checkpoint.

Checkpoint stage. ``weights_only=True`` unpickles tensors, containers and numbers and refuses everything
else (an object whose ``__reduce__`` would run code is an error before it runs); still, a pickle is a
format a user should choose to read, so every caller asks for ``allow_pickle`` first.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import torch

from ..errors import CheckpointError, first_line

PICKLE_SUFFIXES = (".bin", ".pt", ".pth")
"""File name endings of pickled weights (transformers' ``pytorch_model.bin``, ``torch.save``'s ``.pt``)."""

PICKLE_INDEX = "pytorch_model.bin.index.json"
"""transformers' index of sharded pickle weights: replaced by the safetensors index when converted."""


def pickle_weights(path: str | os.PathLike) -> list[Path]:
    """The pickle weight files ``path`` names: the file itself, or those of a folder holding no
    safetensors (a folder with both is read as safetensors); [] for anything else."""
    path = Path(path)
    if path.is_file():
        return [path] if path.suffix in PICKLE_SUFFIXES else []
    if not path.is_dir() or any(path.glob("*.safetensors")):
        return []
    return sorted(p for p in path.iterdir() if p.is_file() and p.suffix in PICKLE_SUFFIXES)


def pickle_refusal(path: Path, what: str = "read") -> CheckpointError:
    """The one-line refusal of a pickle the user did not opt into, naming the flag."""
    return CheckpointError(f"{path} is a pickle, which can run code when read: pass --allow-pickle "
                           f"(allow_pickle=True) to {what} it through torch.load(weights_only=True)")


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A pickled state dict read with ``torch.load(weights_only=True)``, memory-mapped (no copy of the
    weights in memory).

    Raises:
        CheckpointError: the pickle holds anything but tensors (``weights_only`` refuses it before any of
            its code runs), is damaged, or is not a flat dict of tensors.
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as exc:
        raise CheckpointError(f"cannot read {path} with torch.load(weights_only=True) ({first_line(exc)}): "
                              "it holds more than tensors or is damaged; save a plain state_dict") from exc
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path} is not a state dict of tensors: save model.state_dict() instead")
    return state


def pickles_as_safetensors(source: Path, pickles: list[Path], folder: Path) -> Path:
    """Write the state dicts of ``pickles`` as safetensors in ``folder`` (one file per pickle, with an
    index when there are several) and, for a folder ``source``, copy its other files (config, tokenizer);
    returns what to convert: the ``.safetensors`` file for a file ``source``, else ``folder``.

    Tensors that share storage in the pickle (tied weights) are written under each of their names:
    safetensors holds one name per byte range, and a bare pickle has no config to re-tie them from.
    """
    from safetensors.torch import save_file  # imported when used: dtypelab --help imports no heavy package

    names = [_shard_name(i, len(pickles)) if source.is_dir() else p.with_suffix(".safetensors").name
             for i, p in enumerate(pickles)]
    weight_map = {}
    for pickle_file, name in zip(pickles, names, strict=True):
        state = _untied(read_state_dict(pickle_file))
        save_file(state, folder / name, metadata={"format": "pt"})
        weight_map |= dict.fromkeys(state, name)
    if not source.is_dir():
        return folder / names[0]
    for other in sorted(p for p in source.iterdir() if p.is_file()):
        if other.suffix not in PICKLE_SUFFIXES and other.name != PICKLE_INDEX:
            shutil.copy2(other, folder / other.name)
    if len(pickles) > 1:
        index = {"metadata": {}, "weight_map": weight_map}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return folder


def _shard_name(index: int, count: int) -> str:
    return "model.safetensors" if count == 1 else f"model-{index + 1:05d}-of-{count:05d}.safetensors"


def _untied(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every tensor contiguous and with storage of its own (a second name of a shared storage gets a
    copy), as ``safetensors.save_file`` requires."""
    seen: set[int] = set()
    out = {}
    for name, tensor in state.items():
        storage = tensor.untyped_storage().data_ptr()
        out[name] = tensor.contiguous() if storage not in seen else tensor.clone(
            memory_format=torch.contiguous_format)
        seen.add(storage)
    return out
