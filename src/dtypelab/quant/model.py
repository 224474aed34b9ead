"""``quantize_model``: a copy of a model whose Linear (and optionally Embedding) weights are stored in
a scaled format, with every candidate layer's outcome.

Quant stage: builds on :mod:`dtypelab.quant.nn`. The original model is untouched; the layers replaced
hold codes + scales (see :mod:`dtypelab.quant.qtensor`); layers left as they are say why.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field

from torch import nn

from ..errors import InputError
from ..formats import NumberFormat, get_format
from ..naming import any_matches
from ..tree import set_submodule, tied_module_names
from .nn import QuantizedEmbedding, QuantizedLinear


@dataclass(frozen=True)
class LayerOutcome:
    """What happened to one candidate layer.

    Args:
        name: module path (``encoder.layer.0.attention.self.query``).
        kind: ``"Linear"`` or ``"Embedding"``.
        quantized: whether it was replaced.
        reason: why it was skipped ("" when quantized).
        bytes_before, bytes_after: weight storage bytes (after = codes + scales + zero points).
    """

    name: str
    kind: str
    quantized: bool
    reason: str = ""
    bytes_before: int = 0
    bytes_after: int = 0


@dataclass
class QuantizeResult:
    """The quantized model, its format, every candidate layer's outcome, and the time taken."""

    model: nn.Module
    fmt: NumberFormat
    layers: list[LayerOutcome] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def quantized(self) -> list[LayerOutcome]:
        return [layer for layer in self.layers if layer.quantized]

    @property
    def skipped(self) -> list[LayerOutcome]:
        return [layer for layer in self.layers if not layer.quantized]


_LAYER_TYPES = {nn.Linear: QuantizedLinear, nn.Embedding: QuantizedEmbedding}


def quantize_model(model: nn.Module, spec: str | NumberFormat, include: list[str] | None = None,
                   exclude: list[str] | None = None, embeddings: bool = False) -> QuantizeResult:
    """Copy ``model`` and store its Linear (and, if ``embeddings``, Embedding) weights in ``spec``.

    Args:
        model: any torch module; it is not modified.
        spec: a quantized format spec, e.g. ``"int4:g128"``, ``"int8:a8"``, ``"mxfp4"``.
        include: globs on module names (:func:`dtypelab.naming.name_matches`) to consider (default: all).
        exclude: globs on module names to leave as they are.
        embeddings: also quantize ``nn.Embedding`` tables (per row / per group along the dim).
    Returns:
        QuantizeResult with the new model and one LayerOutcome per candidate layer, skipped ones
        with their reason (tied weight, NaN/inf values, group size not dividing, excluded).
    Raises:
        UnknownFormatError: bad spec. InputError: a plain-dtype spec, or nothing got quantized.
    """
    fmt = get_format(spec)
    if not fmt.is_quantized:
        raise InputError(f"{fmt.name} is a plain dtype: use cast for it, quantize takes e.g. int8, int4:g128")
    start = time.perf_counter()
    kinds, tied = ((nn.Linear, nn.Embedding) if embeddings else (nn.Linear,)), tied_module_names(model)
    reasons = {name: _skip_reason(name, module, include, exclude, tied)
               for name, module in model.named_modules() if type(module) in kinds}
    new = _copy_sharing_weights(model, [name for name, reason in reasons.items() if not reason])
    layers = [_quantize_one(new, name, fmt, reason) for name, reason in reasons.items()]
    result = QuantizeResult(new, fmt, layers, time.perf_counter() - start)
    if not result.quantized:
        raise InputError(f"nothing to quantize with {fmt.name}: {_nothing_reason(layers)}")
    return result


def _nothing_reason(layers: list[LayerOutcome]) -> str:
    if not layers:
        return "the model has no nn.Linear layers (pass embeddings=True for nn.Embedding)"
    more = f" (and {len(layers) - 1} more)" if len(layers) > 1 else ""
    return f"every candidate was skipped, e.g. {layers[0].name}: {layers[0].reason}{more}"


def _copy_sharing_weights(model: nn.Module, names: list[str]) -> nn.Module:
    """Deep copy of ``model`` whose layers ``names`` still share the original weights: they are about
    to be replaced, so copying them would only double the peak memory. ``_quantize_one`` gives any
    layer that then fails its own copy, so the original is never reachable from the result."""
    memo = {}
    for name in names:
        weight = model.get_submodule(name).weight
        memo[id(weight)] = weight
    return copy.deepcopy(model, memo)


def _quantize_one(model: nn.Module, name: str, fmt: NumberFormat, reason: str) -> LayerOutcome:
    """Replace one layer in ``model`` (or say why not)."""
    module = model.get_submodule(name)
    kind = type(module).__name__
    before = module.weight.numel() * module.weight.element_size()
    if reason:
        return LayerOutcome(name, kind, False, reason, before, before)
    try:
        replacement = _LAYER_TYPES[type(module)](module, fmt)
    except InputError as err:
        module.weight = nn.Parameter(module.weight.detach().clone(), module.weight.requires_grad)
        return LayerOutcome(name, kind, False, str(err), before, before)
    set_submodule(model, name, replacement)
    return LayerOutcome(name, kind, True, "", before, replacement.qtensor.nbytes)


def _skip_reason(name, module, include, exclude, tied) -> str:
    """Why a candidate layer stays as it is, or "" when it is to be quantized."""
    if not name:
        return "the model itself is the layer; wrap it (nn.Sequential(layer)) to quantize it"
    if include and not any_matches(name, include):
        return "not matched by include"
    if exclude and any_matches(name, exclude):
        return "excluded"
    if name in tied:
        return "weight tied to another module; quantizing one copy would store it twice"
    if isinstance(module, nn.Embedding) and (module.max_norm is not None or module.sparse):
        return "embedding with max_norm or sparse gradients is not supported"
    if not module.weight.is_floating_point():
        return f"weight is {module.weight.dtype}, not floating point"
    return ""
