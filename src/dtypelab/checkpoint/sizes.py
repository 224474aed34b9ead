"""What a model's checkpoint would hold, in bytes: the one size ``compare`` reports and ``convert`` writes.

Checkpoint stage. A safetensors checkpoint holds every persistent tensor of the state dict once (tied
storage once; buffers the model computes itself, such as rotary ``inv_freq``, not at all), and a
quantized layer as the parts of its compressed-tensors layout (packed int32 words, scales, zero points,
the ``weight_shape``), which is what ``convert`` writes for it. A layer in a format with no layout is
counted as it is held in memory (codes, scales, zero points).
"""

from __future__ import annotations

from torch import nn

from ..errors import InputError
from ..quant import QuantizedLinear, QuantizedWeightModule
from ..tree import storage_key, storage_nbytes
from .layouts import check_supported, stored_parts

_CODE_BUFFERS = frozenset({"qweight", "scale", "zero_point", "tensor_scale"})


def stored_nbytes(model: nn.Module) -> int:
    """Bytes of tensor data a safetensors checkpoint of ``model`` holds (headers excluded).

    Example:
        >>> stored_nbytes(DummyModel())  # 30 float32 weights
        120
    """
    quantized = {name: module for name, module in model.named_modules()
                 if isinstance(module, QuantizedWeightModule)}
    seen: set[tuple] = set()
    total = 0
    for name, tensor in model.state_dict(keep_vars=True).items():
        owner, _, leaf = name.rpartition(".")
        if owner in quantized and leaf in _CODE_BUFFERS:
            continue  # counted as its layout's parts below
        key = storage_key(tensor)
        if key not in seen:
            seen.add(key)
            total += storage_nbytes(tensor)
    return total + sum(_layer_nbytes(module) for module in quantized.values())


def stored_numel(model: nn.Module) -> int:
    """Elements of the tensors a checkpoint of ``model`` holds (tied once, computed buffers not), the
    denominator of bits per element; a quantized layer counts its float weight's elements."""
    seen: set[tuple] = set()
    total = 0
    for name, tensor in model.state_dict(keep_vars=True).items():
        owner, _, leaf = name.rpartition(".")
        module = model.get_submodule(owner) if owner else model
        if isinstance(module, QuantizedWeightModule) and leaf in _CODE_BUFFERS:
            if leaf == "qweight":
                total += module.weight_shape[0] * module.weight_shape[1]
            continue
        key = storage_key(tensor)
        if key not in seen:
            seen.add(key)
            total += tensor.numel()
    return total


def weight_stored_nbytes(module: nn.Module) -> int:
    """Bytes a checkpoint holds for one layer's weight: a quantized layer's stored parts (codes, scales,
    zero points, as :func:`stored_nbytes` counts them), else the dense weight as it is held. The size of
    one choice of a mixed-precision plan."""
    if isinstance(module, QuantizedWeightModule):
        return _layer_nbytes(module)
    return storage_nbytes(module.weight)


def _layer_nbytes(module: QuantizedWeightModule) -> int:
    """A quantized layer's stored parts: its compressed-tensors layout, else its in-memory parts."""
    if isinstance(module, QuantizedLinear):
        try:
            check_supported(module.fmt)
        except InputError:
            pass
        else:
            return sum(part.nbytes for part in stored_parts(module.fmt, module.weight_shape))
    return module.qtensor.nbytes
