"""What a model folder's config.json builds: its Linear layers and output head.

Checkpoint stage. For the architectures in :data:`HEADER_RULES` the answer comes from config.json's
``model_type`` and the safetensors headers alone (names, shapes, dtypes; milliseconds, no transformers
import): every 2-D floating ``<module>.weight`` is a Linear weight unless its leaf name is one of the
architecture's embedding tables. Any other architecture falls back to building the model on the meta device
with transformers (imported lazily; seconds, no memory, no code from the folder). The two answers are
tested equal on every architecture of the rule table (tests/checkpoint/test_architecture.py).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import ModelSpecError, first_line
from ..quant import is_conv1d
from .guard import check_model_folder
from .plan import CAST_DTYPES
from .safetensors_file import CheckpointSource, open_checkpoint


@dataclass(frozen=True)
class HeaderRule:
    """How one architecture's checkpoint names tell its layers apart.

    Args:
        embeddings: leaf names of 2-D weights that are embedding tables, not Linear weights.
        conv1d: leaf names of transformers ``Conv1D`` layers (weights stored (in, out)).
        heads: output head module name -> the ``architectures`` suffixes of the classes that have it
            (a head tied to the input embedding is not stored, yet it is a Linear the output's
            quantization_config must ``ignore``).
    """

    embeddings: frozenset[str]
    conv1d: frozenset[str] = frozenset()
    heads: tuple[tuple[str, tuple[str, ...]], ...] = (("lm_head", ("ForCausalLM", "LMHeadModel")),)


_DECODER = HeaderRule(frozenset({"embed_tokens"}))
HEADER_RULES: dict[str, HeaderRule] = {
    "llama": _DECODER,
    "mistral": _DECODER,
    "qwen2": _DECODER,
    "qwen3": _DECODER,
    "gemma": _DECODER,
    "phi3": _DECODER,
    "gpt2": HeaderRule(frozenset({"wte", "wpe"}), frozenset({"c_attn", "c_proj", "c_fc", "q_attn"})),
    "bert": HeaderRule(frozenset({"word_embeddings", "position_embeddings", "token_type_embeddings"}),
                       heads=(("cls.predictions.decoder", ("ForMaskedLM", "ForPreTraining")),)),
}
"""config.json ``model_type`` -> the rule that finds its Linear layers from the headers; an
architecture not listed is built on the meta device instead. Adding one is adding an entry (and its case
to the equality test)."""


Layers = tuple[list[str], set[str], set[str]]
"""(Linear and Conv1D module names, output head names, Conv1D names)."""


def linear_layers(folder: Path, source: CheckpointSource | None = None) -> Layers:
    """The layers whose weight ``convert`` quantizes — every ``nn.Linear`` and transformers ``Conv1D``
    (GPT-2) — with the output head's name(s) and the Conv1D names (their weight is stored (in, out): it is
    quantized as its (out, in) transpose, as a Linear holds it).

    ``source``: the folder's validated headers, when the caller has them (else they are read).

    Raises:
        ModelSpecError: an architecture outside :data:`HEADER_RULES` and transformers missing, or a
            config it cannot build, or one :func:`~dtypelab.checkpoint.guard.check_model_folder` refuses
            (remote code, wrong values, sizes the weights could not fill).
    """
    config = check_model_folder(folder, known_model_types=HEADER_RULES)  # no remote code, sane sizes
    rule = HEADER_RULES.get(config.get("model_type") if isinstance(config.get("model_type"), str) else "")
    if rule is None:
        return meta_linear_layers(folder)
    architectures = [a for a in config.get("architectures") or [] if isinstance(a, str)]
    return header_linear_layers(source or open_checkpoint(folder), rule, architectures)


def header_linear_layers(source: CheckpointSource, rule: HeaderRule,
                         architectures: list[str] = ()) -> Layers:
    """:func:`linear_layers` from the headers: stored 2-D floating weights minus the embedding tables, in
    the checkpoint's order, then the output head of a class in ``architectures`` that has one when the
    checkpoint does not store it (tied)."""
    modules = [entry.name.removesuffix(".weight") for shard in source.shards for entry in shard.tensors
               if entry.name.endswith(".weight") and len(entry.shape) == 2 and entry.dtype in CAST_DTYPES]
    linears = [m for m in modules if m.rpartition(".")[2] not in rule.embeddings]
    conv1d = {m for m in linears if m.rpartition(".")[2] in rule.conv1d}
    heads = {head for head, classes in rule.heads
             if head in linears or any(a.endswith(c) for a in architectures for c in classes)}
    return linears + sorted(heads - set(linears)), heads, conv1d


def meta_linear_layers(folder: Path) -> Layers:
    """:func:`linear_layers` by building the model on the meta device (no memory, no weights, no code
    from the folder): the fallback for architectures the header rule does not cover."""
    model = _meta_model(folder)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    modules = list(model.named_modules())
    conv1d = {name for name, module in modules if is_conv1d(module)}
    linears = [name for name, module in modules if isinstance(module, nn.Linear) or name in conv1d]
    return linears, {name for name, module in modules if head is not None and module is head}, conv1d


def _config(folder: Path) -> dict:
    """config.json as a dict ({} when absent or unreadable: the meta model then says why)."""
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        return {}
    return config if isinstance(config, dict) else {}


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
        cls = getattr(transformers, name, None) if isinstance(name, str) and name.isidentifier() else None
        if cls is None:
            continue
        if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
            raise ModelSpecError(f"config.json's architectures names {name!r}, which is not a transformers "
                                 "model class: fix config.json")
        return cls
    return transformers.AutoModel
