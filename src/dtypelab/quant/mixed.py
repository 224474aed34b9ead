"""A mixed-precision plan: which format each layer is stored in, as a small JSON file.

Quant stage: the plan is data that ``quantize_model``, ``compare --plan`` and ``convert --plan`` all read,
so it lives below every one of them; how a plan is *chosen* (sensitivity, the budget solver) is in
:mod:`dtypelab.analysis`. A plan names its model by a fingerprint of the layer names, shapes and
weight bytes, so applying it to another model is refused instead of quantizing the wrong layers.

File format (``schema`` ``dtypelab/plan/1``)::

    {"schema": "dtypelab/plan/1", "model": "smollm2", "model_hash": "3f…", "budget": "4.5bpw",
     "layers": {"model.layers.0.self_attn.q_proj": {"format": "int4:g64", "bytes": 186624,
                                                    "predicted_damage": 1.2e-4}, …}}

``format`` is a quantized format spec, or ``"dense"`` for a layer the plan leaves as the checkpoint
stores it (its weight's own dtype).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..errors import InputError

PLAN_SCHEMA = "dtypelab/plan/1"
DENSE = "dense"  # a plan's choice for a layer left as the checkpoint stores it


@dataclass(frozen=True)
class LayerChoice:
    """One layer's entry in a plan: ``fmt`` (a format spec or :data:`DENSE`), the bytes its weight is
    stored in (elements, scales and zero points, as ``convert`` writes them) and the damage the
    sensitivity predicted for it (in the ranking's units: KL nats for causal LMs, relative output
    noise power for other models)."""

    fmt: str
    stored_bytes: int
    predicted_damage: float = 0.0


@dataclass
class MixedPlan:
    """A format per layer, with what it was chosen for (``budget``, the text of the user's budget) and
    for which model (``model_hash``: :func:`model_fingerprint` of the planned layers' weights);
    ``metric`` names the damage's units; ``extra`` carries what else the planner recorded (constraints,
    predicted totals) through a save and load unchanged."""

    layers: dict[str, LayerChoice]
    model: str = ""
    model_hash: str = ""
    budget: str = ""
    metric: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def formats(self) -> dict[str, str]:
        """Layer -> format spec of every quantized layer (dense ones left out)."""
        return {name: c.fmt for name, c in self.layers.items() if c.fmt != DENSE}

    @property
    def stored_bytes(self) -> int:
        return sum(c.stored_bytes for c in self.layers.values())

    @property
    def predicted_damage(self) -> float:
        return sum(c.predicted_damage for c in self.layers.values())

    def to_dict(self) -> dict:
        return {"schema": PLAN_SCHEMA, "model": self.model, "model_hash": self.model_hash,
                "budget": self.budget, "metric": self.metric, **self.extra,
                "stored_bytes": self.stored_bytes, "predicted_damage": self.predicted_damage,
                "layers": {name: {"format": c.fmt, "bytes": c.stored_bytes,
                                  "predicted_damage": c.predicted_damage} for name, c in self.layers.items()}}

    def save(self, path: str | Path) -> None:
        """Write the plan as JSON, atomically (a temporary sibling renamed into place)."""
        path = Path(path)
        temporary = path.with_name(f".{path.name}.tmp")
        temporary.write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")
        temporary.replace(path)

    @classmethod
    def load(cls, path: str | Path) -> MixedPlan:
        """Read a plan file; anything that is not one is an :class:`InputError` naming the problem."""
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
            raise InputError(f"cannot read plan {path} ({type(exc).__name__}: {exc}): give a file written "
                             "by `dtypelab plan -o`") from exc
        return cls.from_dict(data, str(path))

    @classmethod
    def from_dict(cls, data: object, where: str = "plan") -> MixedPlan:
        if not isinstance(data, dict) or data.get("schema") != PLAN_SCHEMA:
            raise InputError(f"{where} is not a dtypelab plan (no \"schema\": \"{PLAN_SCHEMA}\"): give a "
                             "file written by `dtypelab plan -o`")
        layers = data.get("layers")
        if not isinstance(layers, dict) or not layers:
            raise InputError(f"{where} lists no layers: write it again with `dtypelab plan -o`")
        choices = {}
        for name, entry in layers.items():
            if not (isinstance(entry, dict) and isinstance(entry.get("format"), str)
                    and isinstance(entry.get("bytes"), int) and not isinstance(entry.get("bytes"), bool)):
                raise InputError(f"{where}: layer {name!r} needs a \"format\" string and a \"bytes\" integer")
            damage = entry.get("predicted_damage", 0.0)
            damage = float(damage) if isinstance(damage, int | float) else math.nan
            choices[name] = LayerChoice(entry["format"], entry["bytes"], damage)
        known = {"schema", "model", "model_hash", "budget", "metric", "layers", "stored_bytes",
                 "predicted_damage"}
        return cls(choices, str(data.get("model", "")), str(data.get("model_hash", "")),
                   str(data.get("budget", "")), str(data.get("metric", "")),
                   {k: v for k, v in data.items() if k not in known})

    def check_model(self, model: nn.Module) -> None:
        """Refuse a plan made for another model: a layer it names that ``model`` lacks (or that is no
        Linear-like layer), or a different fingerprint.

        Raises:
            InputError: one line, naming the first unknown layer or both fingerprints.
        """
        modules = dict(model.named_modules())
        for name in self.layers:
            if name not in modules or not isinstance(getattr(modules[name], "weight", None), torch.Tensor):
                raise InputError(f"the plan names layer {name!r}, which this model does not have: the plan "
                                 f"was made for another model ({self.model or 'unnamed'}); make one for this "
                                 "model with `dtypelab plan`")
        fingerprint = model_fingerprint(layer_weights(model, self.layers))
        if self.model_hash and self.model_hash != fingerprint:
            raise InputError(f"the plan was made for another model (fingerprint {self.model_hash}, this "
                             f"model's is {fingerprint}): make one for this model with `dtypelab plan`")


def model_fingerprint(weights: Mapping[str, torch.Tensor]) -> str:
    """16 hex digits of SHA-256 over each planned layer's name, weight shape and float32 bytes, in name
    order (``weights``: layer name -> its weight, as the model holds it or the checkpoint stores it, so
    a model in memory and its safetensors folder agree). A bf16 copy of a float32 model is another
    model: its values differ."""
    digest = hashlib.sha256()
    for name in sorted(weights):
        weight = weights[name].detach()
        digest.update(f"{name}:{list(weight.shape)};".encode())
        digest.update(weight.to(torch.float32).contiguous().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def layer_weights(model: nn.Module, names: list[str] | set[str] | Mapping) -> dict[str, torch.Tensor]:
    """Layer name -> its float weight, for :func:`model_fingerprint`."""
    return {name: model.get_submodule(name).weight for name in names}
