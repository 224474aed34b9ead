"""What a model folder's config.json builds: its Linear layers and output head, on the meta device.

Checkpoint stage. transformers is imported lazily (only quantized conversion and loading need it); no
code from the folder runs and no memory is used: the model is built on the meta device.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..errors import ModelSpecError, first_line
from ..quant import is_conv1d
from .guard import check_model_folder


def linear_layers(folder: Path) -> tuple[list[str], set[str], set[str]]:
    """The layers the folder's config.json builds whose weight ``convert`` quantizes — every
    ``nn.Linear`` and transformers ``Conv1D`` (GPT-2) — with the output head's name and the Conv1D names
    (their weight is stored (in, out): it is quantized as its (out, in) transpose, as a Linear holds it).

    The model is built on the meta device (no memory, no weights, no code from the folder): a
    checkpoint's names alone cannot tell a Linear weight from an embedding table.

    Raises:
        ModelSpecError: transformers missing, or a config it cannot build.
    """
    model = _meta_model(folder)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    modules = list(model.named_modules())
    conv1d = {name for name, module in modules if is_conv1d(module)}
    linears = [name for name, module in modules if isinstance(module, nn.Linear) or name in conv1d]
    return linears, {name for name, module in modules if head is not None and module is head}, conv1d


def _meta_model(folder: Path) -> nn.Module:
    try:
        import transformers
    except ImportError:
        raise ModelSpecError("quantized outputs need transformers to read config.json: "
                             "pip install 'dtypelab[hf]'") from None
    check_model_folder(folder)  # no auto_map, sane sizes: before transformers reads anything
    try:
        config = transformers.AutoConfig.from_pretrained(folder, trust_remote_code=False)
        cls = model_class(config)
        build = getattr(cls, "_from_config", None) or cls.from_config  # AutoModel: no architectures
        with torch.device("meta"):
            return build(config)
    except Exception as exc:  # noqa: BLE001 - a bad config.json raises many types; one line for each
        raise ModelSpecError(f"transformers cannot build the model of {folder / 'config.json'} "
                             f"({first_line(exc)}): "
                             "quantized outputs need an architecture your transformers knows") from None


def model_class(config: object) -> type:
    """The class named in ``config.architectures`` (what save_pretrained wrote), else AutoModel."""
    import transformers

    for name in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, name, None)
        if cls is not None:
            return cls
    return transformers.AutoModel
