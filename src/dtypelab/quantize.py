"""Quantize a model's Linear (and optionally Embedding) weights into packed storage.

``quantize_model`` returns a new model (the original is untouched) whose selected layers hold their
weight as codes + scales (see :mod:`dtypelab.qtensor`) in buffers, so ``state_dict``, ``torch.save`` and
dtypelab's inspect see the true bytes. Forward dequantizes the weight to the input's dtype, and, for
W8A8 specs, fake-quantizes the activations dynamically first (int8 per token, or fp8 e4m3 per tensor).
"""

from __future__ import annotations

import copy
import fnmatch
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .cast import KeepPolicy, cast_model
from .compare import FailedVariant
from .errors import InputError
from .formats import E4M3, NumberFormat, get_format, split_list
from .peers import PeerError, is_peer_spec, run_peer
from .qtensor import QuantizedTensor, quantize_tensor


def quantize_activations(x: torch.Tensor, kind: str | None) -> torch.Tensor:
    """Dynamic activation fake-quantization: ``"int8"`` per token (last dim), ``"fp8"`` per tensor.

    Scales are absmax / 127 per token or absmax / 448 for the whole tensor (all-zero -> scale 1);
    the result is in ``x``'s dtype. None returns ``x`` unchanged.
    """
    if kind is None:
        return x
    xf = x.float()
    if kind == "int8":
        scale = xf.abs().amax(dim=-1, keepdim=True) / 127.0  # (..., 1): one scale per token
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        return (torch.round(xf / scale).clamp(-127, 127) * scale).to(x.dtype)
    scale = xf.abs().amax() / E4M3.max_finite
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return ((xf / scale).to(torch.float8_e4m3fn).float() * scale).to(x.dtype)


class _QuantizedWeight(nn.Module):
    """Holds a QuantizedTensor's parts as buffers (so state_dict shows the real storage)."""

    def __init__(self, qt: QuantizedTensor, compute_dtype: torch.dtype):
        super().__init__()
        self.fmt, self.weight_shape, self.compute_dtype = qt.fmt, qt.shape, compute_dtype
        self.register_buffer("qweight", qt.data)
        self.register_buffer("scale", qt.scale)
        self.register_buffer("zero_point", qt.zero_point)
        self.register_buffer("tensor_scale", qt.tensor_scale)

    @property
    def qtensor(self) -> QuantizedTensor:
        return QuantizedTensor(self.fmt, self.weight_shape, self.qweight, self.scale,
                               self.zero_point, self.tensor_scale)

    def _apply(self, fn, recurse: bool = True):
        """``.to(device)`` moves codes and scales; ``.half()`` / ``.to(dtype)`` never re-types them
        (that would silently change the stored format) but does change the compute dtype."""
        saved = {name: buf for name, buf in self._buffers.items() if buf is not None}
        super()._apply(fn, recurse)
        for name, original in saved.items():
            self._buffers[name] = original.to(self._buffers[name].device)
        self.compute_dtype = fn(torch.empty(0, dtype=self.compute_dtype)).dtype
        return self

    def extra_repr(self) -> str:
        return f"{self.weight_shape[0]}, {self.weight_shape[1]}, format={self.fmt.name}"


class QuantizedLinear(_QuantizedWeight):
    """``nn.Linear`` with a packed weight, dequantized to the input dtype in forward."""

    def __init__(self, linear: nn.Linear, fmt: NumberFormat):
        self._setup(quantize_tensor(linear.weight, fmt), linear.weight.dtype, linear.bias)

    @classmethod
    def from_qtensor(cls, qt: QuantizedTensor, bias: torch.Tensor | None,
                     compute_dtype: torch.dtype) -> QuantizedLinear:
        """A layer around codes already quantized (a compressed checkpoint's), ``qt.shape`` = (out, in)."""
        layer = cls.__new__(cls)
        layer._setup(qt, compute_dtype, bias)
        return layer

    def _setup(self, qt: QuantizedTensor, compute_dtype: torch.dtype, bias: torch.Tensor | None) -> None:
        super().__init__(qt, compute_dtype)
        self.out_features, self.in_features = qt.shape
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., in) -> (..., out)
        x = quantize_activations(x, self.fmt.activations)
        weight = self.qtensor.dequantize(x.dtype)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, weight, bias)


class QuantizedEmbedding(_QuantizedWeight):
    """``nn.Embedding`` with a packed table; forward dequantizes only the rows it looks up."""

    def __init__(self, embedding: nn.Embedding, fmt: NumberFormat):
        super().__init__(quantize_tensor(embedding.weight, fmt), embedding.weight.dtype)
        self.num_embeddings, self.embedding_dim = embedding.num_embeddings, embedding.embedding_dim
        self.padding_idx = embedding.padding_idx

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # (...) -> (..., dim)
        rows = self.qtensor.dequantize(self.compute_dtype, rows=ids.reshape(-1))
        return rows.reshape(*ids.shape, self.embedding_dim)


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
        include: fnmatch patterns of module names to consider (default: all).
        exclude: fnmatch patterns of module names to leave as they are.
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
    kinds, tied = ((nn.Linear, nn.Embedding) if embeddings else (nn.Linear,)), _tied_names(model)
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


def _tied_names(model: nn.Module) -> set[str]:
    """Names of modules whose weight storage is shared with another module (tied embeddings)."""
    owners: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.Tensor):
            owners.setdefault(weight.untyped_storage().data_ptr(), []).append(name)
    return {name for names in owners.values() if len(set(names)) > 1 for name in names}


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
    if include and not any(fnmatch.fnmatch(name, p) for p in include):
        return "not matched by include"
    if exclude and any(fnmatch.fnmatch(name, p) for p in exclude):
        return "excluded"
    if name in tied:
        return "weight tied to another module; quantizing one copy would store it twice"
    if isinstance(module, nn.Embedding) and (module.max_norm is not None or module.sparse):
        return "embedding with max_norm or sparse gradients is not supported"
    if not module.weight.is_floating_point():
        return f"weight is {module.weight.dtype}, not floating point"
    return ""


def set_submodule(model: nn.Module, name: str, replacement: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, replacement)


def apply_format(model: nn.Module, fmt: str | NumberFormat, keep: KeepPolicy | None = None,
                 embeddings: bool = True) -> nn.Module:
    """A copy of ``model`` in ``fmt``: cast for plain dtypes, :func:`quantize_model` for the rest.

    Args:
        keep: modules to leave alone (cast: kept in float32; quantize: excluded with their children).
        embeddings: quantize ``nn.Embedding`` tables too (only for quantized formats).
    Raises:
        InputError: a quantized format finds nothing it can quantize (the reasons are in the message).
    """
    fmt = get_format(fmt)
    if not fmt.is_quantized:
        return cast_model(model, fmt, keep)
    roots = keep.kept_roots(model) if keep else []
    exclude = [p for root in roots for p in ((root, f"{root}.*") if root else ("*",))]
    return quantize_model(model, fmt, exclude=exclude, embeddings=embeddings).model


def build_variants(reference: nn.Module, specs: str, keep: KeepPolicy | None = None,
                   embeddings: bool = True) -> dict[str, nn.Module | FailedVariant]:
    """One model per item of a ``--to`` list: our formats and peers (``quanto:qint8``, ``torchao:int8wo``).

    A format that finds nothing to quantize, or a peer that fails, becomes a :class:`FailedVariant`
    with its reason; an unknown or malformed spec is still an error, raised before anything runs.
    """
    plans = [(item, None if is_peer_spec(item) else get_format(item)) for item in split_list(specs)]
    return {(fmt.name if fmt else item): _build_one(reference, item, fmt, keep, embeddings)
            for item, fmt in plans}


def _build_one(reference, item, fmt, keep, embeddings) -> nn.Module | FailedVariant:
    try:
        if fmt is None:
            return run_peer(reference, item).model
        return apply_format(reference, fmt, keep, embeddings)
    except (InputError, PeerError) as err:
        return FailedVariant(str(err))
