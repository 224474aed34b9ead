"""``quantize_model``: a copy of a model whose Linear weights are stored in a scaled format, with every
candidate layer's outcome.

Quant stage: builds on :mod:`dtypelab.quant.nn`. The original model is untouched; the layers replaced
hold codes + scales (see :mod:`dtypelab.quant.qtensor`); layers left as they are say why.

What "the model in format X" is, for every command (compare, quantize_model, convert, the plan): the
weights of ``nn.Linear`` layers and of transformers' ``Conv1D`` (GPT-2's attention and MLP, a Linear with
its weight stored transposed) are quantized; embeddings and the output head stay dense, as vLLM serves
them, unless asked for (``embeddings=True`` / ``head=True``, ``--embeddings`` / ``--head``); a weight
tied to another module stays dense (quantizing one copy would store it twice); norms, biases and
buffers stay as they are. Every candidate that stays dense is listed with its reason.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from torch import nn

from ..errors import InputError
from ..formats import NumberFormat, get_format
from ..naming import any_matches
from ..progress import ProgressCallback
from ..tree import set_submodule, tied_module_names
from .calibrate import Batch, CalibrationReport, calibrate_layers
from .mixed import DENSE, MixedPlan
from .nn import QuantizedEmbedding, QuantizedLinear, is_conv1d


@dataclass(frozen=True)
class LayerOutcome:
    """What happened to one candidate layer.

    Args:
        name: module path (``encoder.layer.0.attention.self.query``).
        kind: ``"Linear"``, ``"Conv1D"`` or ``"Embedding"``.
        quantized: whether it was replaced.
        reason: why it stays dense ("" when quantized).
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
    fmt: NumberFormat | None  # None for a mixed-precision plan (each layer's own format)
    layers: list[LayerOutcome] = field(default_factory=list)
    seconds: float = 0.0
    calibration: CalibrationReport | None = None  # what :gptq / :awq calibration did (None otherwise)

    @property
    def quantized(self) -> list[LayerOutcome]:
        return [layer for layer in self.layers if layer.quantized]

    @property
    def skipped(self) -> list[LayerOutcome]:
        return [layer for layer in self.layers if not layer.quantized]


KEPT_REASON = "kept as it is: matched a keep / exclude pattern"
HEAD_REASON = "the output head stays dense, as vLLM serves it; --head quantizes it"
EMBEDDING_REASON = "embeddings stay dense, as vLLM serves them; --embeddings quantizes them"
TIED_REASON = "weight tied to another module; quantizing one copy would store it twice"


def quantize_model(model: nn.Module, spec: str | NumberFormat | Mapping[str, str | NumberFormat] | MixedPlan,
                   include: list[str] | None = None, exclude: list[str] | None = None,
                   embeddings: bool = False, head: bool = False, calibration: Sequence[Batch] | None = None,
                   progress: ProgressCallback | None = None) -> QuantizeResult:
    """Copy ``model`` and store its Linear and Conv1D weights in ``spec`` (see the module docstring).

    Args:
        model: any torch module; it is not modified.
        spec: a quantized format spec, e.g. ``"int4:g128"``, ``"int8:a8"``, ``"mxfp4"``; or a
            mixed-precision plan (a :class:`~dtypelab.quant.mixed.MixedPlan`, or layer name -> format):
            exactly the layers it names are quantized, each in its own format (the plan's dense
            choices and every layer it does not name stay as they are).
        include: globs on module names (:func:`dtypelab.naming.name_matches`) to consider (default: all).
        exclude: globs on module names to leave as they are.
        embeddings: also quantize ``nn.Embedding`` tables (per row / per group along the dim).
        head: also quantize the output head (``model.get_output_embeddings()``), unless it is tied.
        calibration: for ``:gptq`` / ``:awq`` formats, batches of the model's inputs (keyword dicts or
            tensors) to calibrate on, block by block (:mod:`dtypelab.quant.calibrate`); ``progress``
            hears of each block.
    Returns:
        QuantizeResult with the new model and one LayerOutcome per candidate layer (every Linear,
        Conv1D and Embedding), the dense ones with their reason (head, embedding, tied weight, group
        size not dividing, excluded, ...).
    Raises:
        UnknownFormatError: bad spec. InputError: a plain-dtype spec, or nothing got quantized.
    """
    fmt, per_layer = _formats(spec)
    start = time.perf_counter()
    if per_layer is not None:
        include, head = [*per_layer], head or bool(head_names(model) & set(per_layer))
        _check_planned_layers(model, per_layer)
    scope = _Scope(include or [], exclude or [], embeddings, head, tied_module_names(model),
                   head_names(model), per_layer is not None)
    reasons = {name: _skip_reason(name, module, scope)
               for name, module in model.named_modules() if _layer_kind(module)}
    if fmt is not None and fmt.calibration:
        new, layers, report = _calibrated(model, fmt, reasons, calibration, progress)
    elif per_layer is not None and any(f.calibration for f in per_layer.values()):
        new, layers, report = _calibrated_plan(model, per_layer, reasons, calibration, progress)
    else:
        report = None
        new = _copy_sharing_weights(model, [name for name, reason in reasons.items() if not reason])
        layers = [_quantize_one(new, name, per_layer.get(name, fmt) if per_layer else fmt, reason)
                  for name, reason in reasons.items()]
    result = QuantizeResult(new, fmt, layers, time.perf_counter() - start, report)
    if not result.quantized:
        what = fmt.name if fmt else "the plan"
        raise InputError(f"nothing to quantize with {what}: {_nothing_reason(layers)}")
    return result


PLAN_DENSE_REASON = "the plan leaves it dense"


def linear_candidates(model: nn.Module, exclude: list[str] | None = None,
                      head: bool = False) -> dict[str, str]:
    """Every Linear / Conv1D layer of ``model`` -> why it stays dense whatever the format ("" when a
    format may take it): the same scope ``quantize_model`` applies (head, tied weights, ``exclude``
    globs), so a sensitivity ranking or a plan chooses among exactly the layers a format would store.
    Whether a format's group size fits a layer is the format's own question (``group_problem``)."""
    scope = _Scope([], exclude or [], False, head, tied_module_names(model), head_names(model))
    return {name: _skip_reason(name, module, scope) for name, module in model.named_modules()
            if _layer_kind(module) in ("Linear", "Conv1D")}


def _formats(spec) -> tuple[NumberFormat | None, dict[str, NumberFormat] | None]:
    """(the one format, None) for a spec; (None, layer -> format) for a plan or mapping."""
    if isinstance(spec, MixedPlan | Mapping):
        mapping = spec.formats if isinstance(spec, MixedPlan) else \
            {name: f for name, f in spec.items() if f != DENSE}
        per_layer = {name: get_format(f) for name, f in mapping.items()}
        for name, fmt in per_layer.items():
            if not fmt.is_quantized:
                raise InputError(f"the plan puts {name} in {fmt.name}, a plain dtype: a plan quantizes "
                                 f"layers (int8, int4:g64 …) or leaves them {DENSE!r}")
        return None, per_layer
    fmt = get_format(spec)
    if not fmt.is_quantized:
        raise InputError(f"{fmt.name} is a plain dtype: use cast for it, quantize takes e.g. int8, int4:g128")
    return fmt, None


def _check_planned_layers(model: nn.Module, per_layer: dict[str, NumberFormat]) -> None:
    """Every layer a plan names exists and is a Linear / Conv1D (a plan for another model is refused)."""
    modules = dict(model.named_modules())
    for name in per_layer:
        if name not in modules or _layer_kind(modules[name]) not in ("Linear", "Conv1D"):
            raise InputError(f"the plan names layer {name!r}, which is no Linear layer of this model: make "
                             "the plan for this model with `dtypelab plan`")


def _calibrated(model: nn.Module, fmt: NumberFormat, reasons: dict[str, str],
                calibration: Sequence[Batch] | None, progress: ProgressCallback | None):
    """(copy, outcomes, report) of a ``:gptq`` / ``:awq`` quantization. The copy is whole (AWQ folds
    scales into norms); embedding tables have no inputs and are rounded to nearest."""
    if not calibration:
        raise InputError(f"{fmt.name} chooses its codes from calibration inputs: pass calibration= (batches "
                         "of model inputs); the CLI reads the bundled calibration text or --calib-file")
    new = copy.deepcopy(model)
    chosen = [n for n, r in reasons.items() if not r and _layer_kind(new.get_submodule(n)) != "Embedding"]
    dense, report = calibrate_layers(new, fmt, chosen, calibration, progress)
    layers = []
    for name, reason in reasons.items():
        if name in dense or reason or name not in chosen:  # embeddings: round to nearest
            plain = fmt if name in dense or reason else dataclasses.replace(fmt, calibration=None)
            layers.append(_quantize_one(new, name, plain, dense.get(name) or reason))
            continue
        before = model.get_submodule(name).weight
        layers.append(LayerOutcome(name, _layer_kind(model.get_submodule(name)), True, "",
                                   before.numel() * before.element_size(),
                                   new.get_submodule(name).qtensor.nbytes))
    return new, layers, report


def _calibrated_plan(model: nn.Module, per_layer: dict[str, NumberFormat], reasons: dict[str, str],
                     calibration: Sequence[Batch] | None, progress: ProgressCallback | None):
    """(copy, outcomes, report) of a plan naming ``:gptq`` / ``:awq`` formats: its data-free layers are
    rounded to nearest first, so the blocks that calibrate the others run as the planned model will;
    then the calibrated layers, block by block, each in its own format."""
    calibrated = {n: f for n, f in per_layer.items() if f.calibration and not reasons.get(n)}
    if not calibration:
        names = ", ".join(sorted({f.name for f in calibrated.values()}))
        raise InputError(f"the plan's {names} choose codes from calibration inputs: pass calibration= "
                         "(batches of model inputs); the CLI reads the bundled calibration text or "
                         "--calib-file")
    new = copy.deepcopy(model)
    outcomes = {name: _quantize_one(new, name, per_layer.get(name), reason)
                for name, reason in reasons.items() if name not in calibrated}
    dense, report = calibrate_layers(new, calibrated, list(calibrated), calibration, progress)
    for name in calibrated:
        before = model.get_submodule(name).weight
        outcomes[name] = LayerOutcome(name, _layer_kind(model.get_submodule(name)), False, dense[name],
                                      before.numel() * before.element_size(),
                                      before.numel() * before.element_size()) if name in dense else \
            LayerOutcome(name, _layer_kind(model.get_submodule(name)), True, "",
                         before.numel() * before.element_size(), new.get_submodule(name).qtensor.nbytes)
    return new, [outcomes[name] for name in reasons], report


def _nothing_reason(layers: list[LayerOutcome]) -> str:
    """Why no candidate was quantized: each distinct reason once, with an example and a count."""
    if not layers:
        return "the model has no nn.Linear, Conv1D or nn.Embedding layers"
    by_reason: dict[str, list[str]] = {}
    for layer in layers:
        by_reason.setdefault(layer.reason, []).append(layer.name)
    parts = [f"{names[0]}" + (f" (and {len(names) - 1} more)" if len(names) > 1 else "") + f": {reason}"
             for reason, names in sorted(by_reason.items(), key=lambda item: -len(item[1]))]
    return "every candidate was skipped: " + "; ".join(parts)


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
    kind = _layer_kind(module)
    before = module.weight.numel() * module.weight.element_size()
    if reason:
        return LayerOutcome(name, kind, False, reason, before, before)
    try:
        replacement = QuantizedEmbedding(module, fmt) if kind == "Embedding" else QuantizedLinear(module, fmt)
    except InputError as err:
        module.weight = nn.Parameter(module.weight.detach().clone(), module.weight.requires_grad)
        return LayerOutcome(name, kind, False, str(err), before, before)
    set_submodule(model, name, replacement)
    return LayerOutcome(name, kind, True, "", before, replacement.qtensor.nbytes)


@dataclass(frozen=True)
class _Scope:
    """Which candidates a call quantizes: patterns, the dense-by-default families, tied and head names."""

    include: list[str]
    exclude: list[str]
    embeddings: bool
    head: bool
    tied: set[str]
    heads: set[str]
    planned: bool = False  # include lists a plan's layers: the others stay dense as the plan says


def _layer_kind(module: nn.Module) -> str:
    """``"Linear"``, ``"Conv1D"`` (transformers' GPT-2 layer: weight (in, out), no torch base class) or
    ``"Embedding"`` for a candidate layer; ``""`` for anything else."""
    if isinstance(module, nn.Linear):
        return "Linear"
    if isinstance(module, nn.Embedding):
        return "Embedding"
    return "Conv1D" if is_conv1d(module) else ""


def head_names(model: nn.Module) -> set[str]:
    """Names of the module(s) ``model.get_output_embeddings()`` returns (transformers' output head)."""
    getter = getattr(model, "get_output_embeddings", None)
    try:
        head = getter() if callable(getter) else None
    except (NotImplementedError, AttributeError):
        head = None
    return {name for name, module in model.named_modules() if head is not None and module is head}


def _skip_reason(name: str, module: nn.Module, scope: _Scope) -> str:
    """Why a candidate layer stays as it is, or "" when it is to be quantized."""
    if not name:
        return "the model itself is the layer; wrap it (nn.Sequential(layer)) to quantize it"
    if scope.include and not scope.planned and not any_matches(name, scope.include):
        return "not matched by include"
    if scope.exclude and any_matches(name, scope.exclude):
        return KEPT_REASON
    if name in scope.heads and not scope.head:
        return HEAD_REASON
    if isinstance(module, nn.Embedding) and not scope.embeddings:
        return EMBEDDING_REASON
    if scope.planned and name not in scope.include:
        return PLAN_DENSE_REASON
    if name in scope.tied:
        return TIED_REASON
    if isinstance(module, nn.Embedding) and (module.max_norm is not None or module.sparse):
        return "embedding with max_norm or sparse gradients is not supported"
    if not module.weight.is_floating_point():
        return f"weight is {module.weight.dtype}, not floating point"
    return ""
