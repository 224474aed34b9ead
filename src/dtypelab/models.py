"""Models dtypelab can build by name, and how a model spec on the command line is resolved.

Built-in names are safe: they build a known architecture in-process. ``package.module:factory``
imports and runs user code, so it is only accepted in that explicit form.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from .errors import InputError, ModelSpecError


class DummyModel(nn.Module):
    """The seed notebook's model: an embedding, two (Linear -> LayerNorm) blocks and a head.

    Construction is deterministic (seed 123, the notebook's) without disturbing the caller's
    global random state, so ``DummyModel()`` always has the same 30 weights
    (11 tensors, 120 bytes in float32).
    """

    def __init__(self) -> None:
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(123)
            self.token_embedding = nn.Embedding(2, 2)
            self.linear_1 = nn.Linear(2, 2)  # block 1
            self.layernorm_1 = nn.LayerNorm(2)
            self.linear_2 = nn.Linear(2, 2)  # block 2
            self.layernorm_2 = nn.LayerNorm(2)
            self.head = nn.Linear(2, 2)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        hidden_states = self.token_embedding(input_ids)  # (batch, seq, 2)
        hidden_states = self.layernorm_1(self.linear_1(hidden_states))
        hidden_states = self.layernorm_2(self.linear_2(hidden_states))
        return self.head(hidden_states)  # (batch, seq, 2) logits


@dataclass(frozen=True)
class BuiltinModel:
    """A model dtypelab can build without user code.

    Args:
        name: the name used on the command line.
        factory: builds the model in float32.
        default_input: token ids used when the user gives none.
        output_kind: ``"logits"`` (softmax metrics apply) or ``"hidden"``.
        description: one line for help and listings.
    """

    name: str
    factory: Callable[[], nn.Module]
    default_input: tuple[tuple[int, ...], ...]
    output_kind: str
    description: str


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    "dummy": BuiltinModel("dummy", DummyModel, ((1, 0, 1),), "logits",
                          "the seed notebook's DummyModel (11 tensors, 30 weights, vocabulary of 2)"),
}


def builtin_names() -> list[str]:
    return sorted(BUILTIN_MODELS)


def resolve_factory(spec: str) -> Callable[[], nn.Module]:
    """Return the factory for a built-in name or an explicit ``package.module:factory``."""
    if spec in BUILTIN_MODELS:
        return BUILTIN_MODELS[spec].factory
    if ":" not in spec:
        raise ModelSpecError(f"unknown model {spec!r}: use a built-in ({', '.join(builtin_names())}) "
                             "or 'package.module:factory' to run your own code")
    return _import_factory(spec)


def _import_factory(spec: str) -> Callable[[], nn.Module]:
    module_name, _, attr = spec.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ModelSpecError(f"cannot import factory {spec!r} ({exc}): check the module is importable "
                             "and the name after ':' exists") from exc
    if not callable(factory):
        raise ModelSpecError(f"{spec!r} is not callable: point to a function or class that builds the model")
    return factory


def build_model(spec: str) -> nn.Module:
    """Build the model named by ``spec`` (see :func:`resolve_factory`) in eval mode."""
    model = resolve_factory(spec)()
    if not isinstance(model, nn.Module):
        raise ModelSpecError(f"{spec!r} returned {type(model).__name__}, not a torch.nn.Module")
    return model.eval()


def default_input(spec: str) -> torch.Tensor | None:
    entry = BUILTIN_MODELS.get(spec)
    return torch.tensor(entry.default_input, dtype=torch.long) if entry else None


def output_kind(spec: str) -> str:
    entry = BUILTIN_MODELS.get(spec)
    return entry.output_kind if entry else "auto"


def validate_token_ids(model: nn.Module, input_ids: torch.Tensor) -> None:
    """Refuse ids outside the model's vocabulary before an index error deep in the forward."""
    embedding = next((m for m in model.modules() if isinstance(m, nn.Embedding)), None)
    if embedding is None or input_ids.numel() == 0:
        return
    low, high = int(input_ids.min()), int(input_ids.max())
    if low < 0 or high >= embedding.num_embeddings:
        raise InputError(f"token id {high if high >= embedding.num_embeddings else low} is outside the "
                         f"vocabulary: use ids from 0 to {embedding.num_embeddings - 1}")
