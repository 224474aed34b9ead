"""What kind of model and output dtypelab is looking at, as enums.

Models stage. A :class:`~dtypelab.models.LoadedModel` knows its :class:`ModelKind` from the moment it is
loaded; the analysis stage reads it from there instead of re-deriving it.
"""

from __future__ import annotations

from torch import nn

from ..enums import StrEnum


class ModelKind(StrEnum):
    """causal-lm (next-token metrics apply), transformers (another Hugging Face model), module."""

    CAUSAL_LM = "causal-lm"
    TRANSFORMERS = "transformers"
    MODULE = "module"


class OutputKind(StrEnum):
    """What a model's compared output is: logits (softmax metrics), hidden states, or auto (decided from
    the output: logits when it has a ``logits`` field)."""

    LOGITS = "logits"
    HIDDEN = "hidden"
    AUTO = "auto"


def model_kind(model: nn.Module) -> ModelKind:
    """causal-lm for transformers' causal LM classes, transformers for other Hugging Face models,
    module for plain torch modules (decided once, when a model is loaded)."""
    if not hasattr(model, "config") or not hasattr(model, "get_input_embeddings"):
        return ModelKind.MODULE
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    values = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()
    names = {n for v in values for n in ([v] if isinstance(v, str) else v)}
    return ModelKind.CAUSAL_LM if type(model).__name__ in names else ModelKind.TRANSFORMERS
