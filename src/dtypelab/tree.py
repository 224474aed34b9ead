"""Walking module trees and nested outputs: tensor mapping, submodule replacement, shared storage.

Base layer: imports torch only. The one tied-weight detector lives here (:func:`storage_key`,
:func:`tied_module_names`, :func:`modules_sharing_with`): ``inspect`` counts shared bytes once with it,
``quantize_model`` skips tied layers with it, and ``cast_model`` keeps a tied embedding with its kept head.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import torch
from torch import nn

from .naming import inside_any


def map_tensors(value: object, fn, update_mappings: bool = False) -> object:
    """``value`` with ``fn`` applied to every tensor inside it, through tuples, namedtuples, lists and
    plain dicts (new containers: a caller's batch is never changed). Other mappings (a ``ModelOutput``
    a module returned) are updated in place when ``update_mappings``, else returned as they are."""
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, tuple) and hasattr(value, "_fields"):  # namedtuple
        return type(value)(*(map_tensors(v, fn, update_mappings) for v in value))
    if isinstance(value, list | tuple):
        return type(value)(map_tensors(v, fn, update_mappings) for v in value)
    if type(value) is dict:
        return {key: map_tensors(item, fn, update_mappings) for key, item in value.items()}
    if update_mappings and isinstance(value, dict):
        for key in list(value):
            value[key] = map_tensors(value[key], fn, update_mappings)
    return value


def iter_tensors(value: object) -> Iterator[torch.Tensor]:
    """Every tensor inside ``value``: tensors, tuples, lists and any mapping (a ``ModelOutput`` too)."""
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, Mapping):
        for item in value.values():
            yield from iter_tensors(item)
    elif isinstance(value, list | tuple):
        for item in value:
            yield from iter_tensors(item)


def map_floating(value: object, dtype: torch.dtype) -> object:
    """Cast every floating tensor inside tensors, tuples, lists and dicts (model outputs) to ``dtype``."""
    return map_tensors(value, lambda t: t.to(dtype) if t.is_floating_point() else t, update_mappings=True)


def set_submodule(model: nn.Module, name: str, replacement: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, replacement)


def storage_parts(tensor: torch.Tensor) -> list[torch.Tensor]:
    """The plain tensors that hold ``tensor``'s bytes.

    Quantized tensor subclasses (optimum-quanto's QTensors, torchao's Int8Tensor, ...) report the
    dtype they dequantize to (float32) while their storage is int8 / uint8 / float8 data plus scales;
    they expose it through ``__tensor_flatten__``, which this follows recursively.
    """
    if not is_tensor_subclass(tensor):
        return [tensor]
    names, _ = tensor.__tensor_flatten__()
    inner = [getattr(tensor, name) for name in names]
    return [part for t in inner if isinstance(t, torch.Tensor) for part in storage_parts(t)]


def is_tensor_subclass(tensor: torch.Tensor) -> bool:
    """A tensor subclass that keeps its bytes in inner tensors (``__tensor_flatten__``)."""
    return type(tensor) not in (torch.Tensor, nn.Parameter) and hasattr(tensor, "__tensor_flatten__")


def storage_dtype(tensor: torch.Tensor) -> str:
    """Dtype(s) the bytes are stored in: ``float32``, or ``int8+float32`` for a quantized subclass."""
    dtypes = dict.fromkeys(str(p.dtype).removeprefix("torch.") for p in storage_parts(tensor))
    return "+".join(dtypes)


def storage_nbytes(tensor: torch.Tensor) -> int:
    """Bytes actually stored (codes + scales for quantized subclasses), not numel x reported dtype."""
    return sum(p.numel() * p.element_size() for p in storage_parts(tensor))


def own_tensors(module: nn.Module) -> list[torch.Tensor]:
    """The parameters and buffers ``module`` holds itself (not its children's)."""
    return [*module.parameters(recurse=False), *module.buffers(recurse=False)]


def storage_key(tensor: torch.Tensor) -> tuple:
    """Identity of the bytes a tensor views; two tensors with one key are one allocation (tied).

    Meta tensors and empty storages (every one has data_ptr 0) are never shared.
    """
    if tensor.device.type == "meta":
        return ("no storage", id(tensor))
    first = storage_parts(tensor)[0]
    if first.untyped_storage().nbytes() == 0:
        return ("no storage", id(tensor))
    return (first.device.type, first.untyped_storage().data_ptr(), first.storage_offset(),
            tuple(tensor.shape), storage_dtype(tensor))


def module_storage_keys(model: nn.Module, floating_only: bool = False) -> dict[str, set[tuple]]:
    """Module name -> storage keys of the tensors it holds itself (tied modules listed under each name)."""
    keys: dict[str, set[tuple]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        tensors = [t for t in own_tensors(module) if t.is_floating_point() or not floating_only]
        keys.setdefault(name, set()).update(storage_key(t) for t in tensors)
    return keys


def tied_module_names(model: nn.Module, kinds: tuple[type, ...] = (nn.Module,)) -> set[str]:
    """Names of the modules of ``kinds`` holding a tensor that another module holds too (tied weights)."""
    owners: dict[tuple, set[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        for tensor in own_tensors(module):
            owners.setdefault(storage_key(tensor), set()).add(name)
    wanted = {name for name, m in model.named_modules(remove_duplicate=False) if isinstance(m, kinds)}
    return {name for names in owners.values() if len(names) > 1 for name in names if name in wanted}


def modules_sharing_with(model: nn.Module, roots: Sequence[str]) -> list[str]:
    """``roots`` plus every module holding a floating tensor that a module inside them holds too, until
    no more join (a chain of ties is followed whole). Shared integer buffers are never cast, so they
    tie nothing."""
    roots, keys = list(roots), module_storage_keys(model, floating_only=True)
    while True:
        inside = set().union(*(k for name, k in keys.items() if inside_any(name, roots)))
        sharing = [name for name, k in keys.items() if not inside_any(name, roots) and k & inside]
        if not sharing:
            return roots
        roots += sharing

