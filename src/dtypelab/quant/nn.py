"""Quantized modules: a layer that holds its weight as codes + scales and computes in float.

Quant stage: builds on :mod:`dtypelab.quant.qtensor`. The parts are buffers, so ``state_dict``,
``torch.save`` and ``inspect_model`` see the true bytes; forward dequantizes the weight to the input's
dtype and, for W8A8 specs, fake-quantizes the activations first (:mod:`dtypelab.quant.activations`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..formats import NumberFormat
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
        x = quantize_activations(x, self.fmt.activations)
        weight = self.qtensor.dequantize(x.dtype)
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
