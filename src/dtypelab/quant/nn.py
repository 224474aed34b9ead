"""Quantized modules: a layer that holds its weight as codes + scales and computes in float.

Quant stage: builds on :mod:`dtypelab.quant.qtensor`. The parts are buffers, so ``state_dict``,
``torch.save`` and ``inspect_model`` see the true bytes; forward dequantizes the weight to the input's
dtype and, for W8A8 specs, fake-quantizes the activations first (:mod:`dtypelab.quant.activations`).

A measurement run that sends many forwards through one quantized model (compare's batches, a sweep)
can open :func:`dequantized_once`: each layer then dequantizes its weight on its first forward and
reuses it until the context closes, within a memory budget, with outputs bit for bit those of the
per-call path.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputError
from ..formats import Granularity, IntCodec, NumberFormat
from .activations import quantize_activations
from .qtensor import QuantizedTensor, quantize_tensor


class QuantizedWeightModule(nn.Module):
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


def is_conv1d(module: nn.Module) -> bool:
    """transformers' ``Conv1D`` (GPT-2): a Linear whose weight is stored (in, out); it has no torch base
    class, so it is recognised by name and its ``nf`` (output features) attribute, without importing
    transformers."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and \
        isinstance(getattr(module, "weight", None), torch.Tensor)


class QuantizedLinear(QuantizedWeightModule):
    """``nn.Linear`` (or transformers' ``Conv1D``) with a packed weight, dequantized to the input dtype in
    forward. A Conv1D's (in, out) weight is quantized as its transpose, the (out, in) matrix a Linear
    holds, so scales run along each output's inputs as for every other layer (and as vLLM, which loads
    GPT-2's Conv1D weights into Linear layers, computes)."""

    def __init__(self, linear: nn.Module, fmt: NumberFormat):
        weight = linear.weight.t().contiguous() if is_conv1d(linear) else linear.weight  # (out, in)
        self._setup(quantize_tensor(weight, fmt), linear.weight.dtype, linear.bias)

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
        if self.__dict__.get("_int8_matmul") and _int_mm_fits(x, self.weight_shape):  # inside int8_matmul
            return _int8_linear(x, self.qtensor, self.bias)
        x = quantize_activations(x, self.fmt.activations)
        slot = self.__dict__.get("_dequantized_once")  # set only inside dequantized_once(...)
        weight = self.qtensor.dequantize(x.dtype) if slot is None else slot.weight(self, x.dtype)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, weight, bias)


class QuantizedEmbedding(QuantizedWeightModule):
    """``nn.Embedding`` with a packed table; forward dequantizes only the rows it looks up."""

    def __init__(self, embedding: nn.Embedding, fmt: NumberFormat):
        super().__init__(quantize_tensor(embedding.weight, fmt), embedding.weight.dtype)
        self.num_embeddings, self.embedding_dim = embedding.num_embeddings, embedding.embedding_dim
        self.padding_idx = embedding.padding_idx

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # (...) -> (..., dim)
        rows = self.qtensor.dequantize(self.compute_dtype, rows=ids.reshape(-1))
        return rows.reshape(*ids.shape, self.embedding_dim)


DEQUANTIZE_ONCE_BUDGET_BYTES = 1 << 30
"""Default budget of :func:`dequantized_once`: 1 GiB of dequantized weights. A measurement run already
holds the float32 reference (4 bytes per weight) beside the variant, and a variant's dequantized
weights take at most as much again (same shapes, the reference's compute dtype); 1 GiB holds every
built-in whole (smollm2's 30 Linear layers are ~0.43 GB in float32, minilm's 0.04 GB) and adds at most
a quarter to a 1B-parameter float32 run. Larger models cache their first layers and run the rest
per call."""


@dataclass
class DequantizedOnce:
    """What :func:`dequantized_once` holds: the layers that reuse one dequantized weight (``cached``,
    their names) and those that dequantize per call (``per_call``: beyond the budget, or none left).

    ``reserved_bytes``: the budget taken by ``cached`` layers (each weight's elements times its compute
    dtype's size), never more than ``budget_bytes``; ``held_bytes``: what is materialized now (a layer
    caches on its first forward; 0 again once the context has closed).
    """

    budget_bytes: int
    cached: list[str] = field(default_factory=list)
    per_call: list[str] = field(default_factory=list)
    reserved_bytes: int = 0
    _slots: list[_DequantizedSlot] = field(default_factory=list, repr=False)

    @property
    def held_bytes(self) -> int:
        return sum(slot.held_bytes for slot in self._slots)


@dataclass
class _DequantizedSlot:
    """One layer's reserved place: its weight dequantized to ``dtype`` on first use and then reused."""

    dtype: torch.dtype
    cached: torch.Tensor | None = None

    @property
    def held_bytes(self) -> int:
        return 0 if self.cached is None else self.cached.numel() * self.cached.element_size()

    def weight(self, layer: QuantizedLinear, dtype: torch.dtype) -> torch.Tensor:
        """The weight in ``dtype``: the cached copy for the reserved dtype, per call for any other (a
        reservation is sized for its dtype only, so the budget holds whatever the inputs are)."""
        if dtype != self.dtype:
            return layer.qtensor.dequantize(dtype)
        if self.cached is None:
            self.cached = layer.qtensor.dequantize(dtype)
        return self.cached


@contextmanager
def dequantized_once(model: nn.Module, budget_bytes: int = DEQUANTIZE_ONCE_BUDGET_BYTES
                     ) -> Iterator[DequantizedOnce]:
    """Inside the context, each :class:`QuantizedLinear` of ``model`` dequantizes its weight once and
    reuses it, for measurement runs that send many forwards through one variant.

    Bit for bit the per-call path: the cached weight is ``qtensor.dequantize(dtype)`` of the same codes
    in the same dtype the forward asks for (the input's), and the forward is otherwise unchanged
    (activations of W8A8 formats are still rounded per call). Layers are taken in module order while
    their weight (elements x the compute dtype's size) fits in what is left of ``budget_bytes``; the
    rest keep the per-call path, so the cache never holds more than the budget (default
    :data:`DEQUANTIZE_ONCE_BUDGET_BYTES`, whose docstring gives its reasoning). Every cached weight is
    dropped on exit, also on an exception; a layer already inside an enclosing context keeps that one's
    cache. Do not move, re-type or change the model inside the context: a cached weight would not
    follow.

    Raises:
        InputError: a negative budget.
    Example:
        >>> with dequantized_once(variant) as held:
        ...     outputs = [variant(**batch) for batch in batches]
        >>> held.cached, held.held_bytes  # the layers that reused one weight; 0 bytes once closed
    """
    if budget_bytes < 0:
        raise InputError(f"budget_bytes must be >= 0, not {budget_bytes}")
    held = DequantizedOnce(budget_bytes)
    layers = [(name, m) for name, m in model.named_modules()
              if isinstance(m, QuantizedLinear) and "_dequantized_once" not in m.__dict__]
    try:
        for name, layer in layers:
            _reserve(held, name, layer)
        yield held
    finally:
        for _, layer in layers:
            layer.__dict__.pop("_dequantized_once", None)
        for slot in held._slots:
            slot.cached = None


def _reserve(held: DequantizedOnce, name: str, layer: QuantizedLinear) -> None:
    """Give ``layer`` a slot when its dequantized weight fits in the budget left, else leave it per call."""
    out_features, in_features = layer.weight_shape
    nbytes = out_features * in_features * torch.empty(0, dtype=layer.compute_dtype).element_size()
    if held.reserved_bytes + nbytes > held.budget_bytes:
        held.per_call.append(name)
        return
    slot = _DequantizedSlot(layer.compute_dtype)
    layer.__dict__["_dequantized_once"] = slot
    held.cached.append(name)
    held.reserved_bytes += nbytes
    held._slots.append(slot)


@contextmanager
def int8_matmul(model: nn.Module) -> Iterator[list[str]]:
    """Inside the context, ``model``'s W8A8 integer layers (``int8:a8``: int8 per-channel symmetric
    weights, int8 per-token activations) multiply through ``torch._int_mm``: the activations' int8 codes
    times the weight's int8 codes, accumulated exactly in int32, then scaled (float32) by each token's
    and each output channel's scale, plus the bias.

    A deployment's compute, not a measurement's: the same codes as the emulated path (activations
    rounded per token as :func:`~dtypelab.quant.activations.quantize_activations` does, weights as
    stored), but summed exactly where the emulation sums float products, so a layer's outputs differ
    from it by float32 rounding only (at most ~(in_features + 8) x 2^-24 of sum |x| |w| per output;
    tests/quant/test_int8_matmul.py). Through a whole model such a difference can move an activation
    across a rounding boundary of the next layer's int8 grid, so outputs then differ by a step of that
    grid here and there, with the same error against float32 (minilm: same SQNR to 0.01 dB, forward
    0.68x float32's at one thread; ``docs/benchmarks.md``). Other layers, and inputs the kernel does
    not take (CUDA needs more than 16 rows and widths in multiples of 8), keep the emulated path.
    Yields the names of the layers switched; on exit every layer is emulated again.
    """
    layers = [(name, m) for name, m in model.named_modules()
              if isinstance(m, QuantizedLinear) and _takes_int8_matmul(m.fmt)]
    try:
        for _, layer in layers:
            layer.__dict__["_int8_matmul"] = True
        yield [name for name, _ in layers]
    finally:
        for _, layer in layers:
            layer.__dict__.pop("_int8_matmul", None)


def _takes_int8_matmul(fmt: NumberFormat) -> bool:
    """int8 per-channel symmetric weights (codes -128..127, one float scale per output) with int8
    per-token activations: what ``_int_mm`` plus two scales computes exactly."""
    codec = fmt.codec
    return (fmt.activations == "int8" and isinstance(codec, IntCodec) and codec.int_bits == 8
            and fmt.symmetric and fmt.granularity == Granularity.CHANNEL and not fmt.tensor_scale)


def _int_mm_fits(x: torch.Tensor, weight_shape: tuple[int, int]) -> bool:
    """torch._int_mm's shape rules: any shape on CPU; on CUDA more than 16 rows, widths divisible by 8."""
    if x.device.type == "cpu":
        return True
    rows = x.numel() // max(x.shape[-1], 1)
    return x.device.type == "cuda" and rows > 16 and all(n % 8 == 0 for n in weight_shape)


def _int8_linear(x: torch.Tensor, qt: QuantizedTensor, bias: torch.Tensor | None) -> torch.Tensor:
    """(..., in) -> (..., out): per-token int8 codes of ``x`` (quantize_activations' rule) @ the weight's
    int8 codes, in int32, times token scale x channel scale (float32), plus bias, in ``x``'s dtype."""
    rows = x.reshape(-1, x.shape[-1]).float()
    scale = rows.abs().amax(dim=-1, keepdim=True) / 127.0  # (tokens, 1), as quantize_activations
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    codes = torch.round(rows / scale).clamp_(-127, 127).to(torch.int8)
    acc = torch._int_mm(codes, qt.data.t())  # (tokens, out) int32: exact (|sum| < 127 * 128 * in)
    out = acc.float() * scale * qt.scale.float().reshape(1, -1)
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype).reshape(*x.shape[:-1], qt.shape[0])


@contextmanager
def computing_in(model: nn.Module, dtype: torch.dtype) -> Iterator[int]:
    """Inside the context, ``model`` computes in ``dtype`` (a deployment's ``--compute bf16``): every
    floating parameter and buffer of its dense modules is a ``dtype`` copy, and quantized layers
    dequantize into ``dtype`` (their codes and scales stay as stored, as a serving kernel reads them).
    Feed it ``dtype`` inputs. On exit every original tensor is back, also on an exception; tied weights
    stay tied. Yields how many tensors were re-typed.

    Memory: the copies beside the originals (a float32 model computing in bf16: +50% of its dense bytes).
    """
    swapped: list[tuple[dict, str, torch.Tensor]] = []
    copies: dict[int, torch.Tensor] = {}  # id(original) -> its copy: a tied weight is copied once
    saved_compute = [(m, m.compute_dtype) for m in model.modules() if isinstance(m, QuantizedWeightModule)]
    try:
        for module in model.modules():
            if isinstance(module, QuantizedWeightModule):
                module.compute_dtype = dtype  # QuantizedLinear casts its bias per call already
                continue
            for table in (module._parameters, module._buffers):
                for name, tensor in table.items():
                    if tensor is None or not tensor.is_floating_point() or tensor.dtype == dtype:
                        continue
                    if id(tensor) not in copies:
                        copy = tensor.detach().to(dtype)
                        copies[id(tensor)] = nn.Parameter(copy, tensor.requires_grad) if table is \
                            module._parameters else copy
                    swapped.append((table, name, tensor))
                    table[name] = copies[id(tensor)]
        yield len(copies)
    finally:
        for table, name, original in reversed(swapped):
            table[name] = original
        for module, compute_dtype in saved_compute:
            module.compute_dtype = compute_dtype
