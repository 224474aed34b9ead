"""Loading a compressed-tensors folder into dtypelab's own quantized modules (no extra package needed).

Checkpoint stage: the stored parts are read back through :mod:`dtypelab.checkpoint.layouts`, so nothing
is re-quantized; ``dtypelab.load`` calls :func:`build_quantized_model` when config.json holds a
compressed-tensors ``quantization_config``.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

from ..errors import InputError
from ..quant import QuantizedLinear, is_conv1d
from ..tree import set_submodule, storage_key
from .layouts import QUANT_METHOD, format_from_scheme, from_parts, stored_parts, stored_suffixes


def load_quantized_weights(model: nn.Module, scheme: dict | list[dict], tensors: dict[str, torch.Tensor]
                           ) -> list[str]:
    """Replace every Linear of ``model`` stored quantized in ``tensors`` with dtypelab's
    :class:`~dtypelab.quant.QuantizedLinear`, built from the stored codes (nothing re-quantized).
    ``scheme``: the one scheme, or the config groups of a mixed-precision checkpoint (each layer takes
    the group whose ``targets`` name it, else the one that targets the ``Linear`` class).

    ``tensors`` (a checkpoint's state dict) loses the parts it used; what remains is dense.

    Returns:
        The names of the modules replaced.
    Raises:
        InputError: a stored layer that is not a Linear of the model, or a scheme dtypelab cannot hold.
    """
    names = sorted(key.removesuffix(".weight_scale") for key in tensors if key.endswith(".weight_scale"))
    for name in names:
        linear = _linear(model, name)
        parts = {suffix: tensors.pop(f"{name}.{suffix}") for suffix in stored_suffixes()
                 if f"{name}.{suffix}" in tensors}
        fmt = format_from_scheme(scheme_for(scheme, name), parts["weight_scale"].dtype)
        check_parts(name, fmt, parts, _out_in(linear))
        qt = from_parts(fmt, parts, _out_in(linear))
        set_submodule(model, name, QuantizedLinear.from_qtensor(qt, linear.bias, linear.weight.dtype))
    return names


def check_parts(name: str, fmt: object, parts: dict[str, torch.Tensor], shape: tuple[int, int]) -> None:
    """The stored parts must be exactly what ``fmt`` stores for a (out, in) ``shape`` weight — names,
    dtypes, shapes, and ``weight_shape``'s values: a tampered quantization_config (``num_bits: 8`` on int4
    codes, a group size the scales do not have, ``symmetric: false`` without zero points) is an error,
    never codes read under the wrong scheme."""
    expected = {part.suffix: part for part in stored_parts(fmt, shape)}
    for suffix in sorted(set(expected) | set(parts)):
        part, stored = expected.get(suffix), parts.get(suffix)
        if part is None or stored is None or stored.dtype != part.dtype or tuple(stored.shape) != part.shape:
            found = "absent" if stored is None else f"{stored.dtype} {tuple(stored.shape)}"
            wanted = "absent" if part is None else f"{part.dtype} {part.shape}"
            raise InputError(f"{name}.{suffix} is {found}, but the quantization_config ({fmt.name}) stores "
                             f"{wanted} for a {shape[0]}x{shape[1]} weight: config.json does not match the "
                             "weights")
    if "weight_shape" in parts and tuple(parts["weight_shape"].tolist()) != tuple(shape):
        raise InputError(f"{name}.weight_shape says {parts['weight_shape'].tolist()}, but the layer is "
                         f"{shape[0]}x{shape[1]}: config.json does not match the weights")


def scheme_for(schemes: dict | list[dict], name: str) -> dict:
    """The scheme of layer ``name``: the group listing it in ``targets`` (a name, or ``re:`` + a regular
    expression, as compressed-tensors matches them), else the group targeting the ``Linear`` class."""
    groups = [schemes] if isinstance(schemes, dict) else schemes
    for group in groups:
        for target in group.get("targets") or []:
            if target == name or (isinstance(target, str) and target.startswith("re:")
                                  and re.fullmatch(target[3:], name)):
                return group
    fallback = [g for g in groups if "Linear" in (g.get("targets") or [])]
    if len(fallback) != 1:
        raise InputError(f"quantization_config names no scheme for {name!r} (its config groups target "
                         f"{[g.get('targets') for g in groups]}): check config.json matches the weights")
    return fallback[0]


def _linear(model: nn.Module, name: str) -> nn.Module:
    """The Linear (or GPT-2 Conv1D) layer ``name`` of ``model``, or a clear error."""
    try:
        module = model.get_submodule(name)
    except AttributeError:
        module = None
    if not (isinstance(module, nn.Linear) or is_conv1d(module)):
        raise InputError(f"checkpoint stores {name!r} quantized, but the model has no Linear layer of "
                         "that name: check config.json matches the weights")
    return module


def _out_in(layer: nn.Module) -> tuple[int, int]:
    """(out, in) of the matrix the layer computes with: a Conv1D's weight is stored (in, out)."""
    rows, cols = layer.weight.shape
    return (cols, rows) if is_conv1d(layer) else (rows, cols)


def quantization_scheme(config: object) -> dict | list[dict] | None:
    """The weight scheme of a compressed-tensors ``quantization_config``: the one scheme, or the list of
    config groups of a mixed-precision checkpoint (None when the config has none, or another method).

    Raises:
        InputError: no config group, or one that is not a JSON object.
    """
    qconfig = getattr(config, "quantization_config", None)
    if not isinstance(qconfig, dict) or qconfig.get("quant_method") != QUANT_METHOD:
        return None
    groups = qconfig.get("config_groups")
    groups = list(groups.values()) if isinstance(groups, dict) else []
    if not groups or not all(isinstance(g, dict) for g in groups):
        raise InputError("quantization_config has no usable config group (each must be a JSON object with "
                         "targets and weights): check config.json")
    return groups[0] if len(groups) == 1 else groups


def build_quantized_model(folder: Path, config: object, scheme: dict, model_cls: type,
                          dtype: torch.dtype | None) -> nn.Module:
    """A model from ``config`` (its quantization_config set aside) with the folder's weights: quantized
    layers as dtypelab modules, everything else loaded dense; ``dtype`` None takes config's dtype.

    The model is built in that dtype, as ``from_pretrained`` builds it (buffers such as rotary
    frequencies stay float32), rather than cast afterwards.
    """
    from safetensors.torch import load_file

    del config.quantization_config
    dtype = dtype or _config_dtype(config)
    model = model_cls._from_config(config, dtype=dtype) if hasattr(model_cls, "_from_config") \
        else model_cls(config).to(dtype)
    tensors = {k: v for file in sorted(folder.glob("*.safetensors")) for k, v in load_file(file).items()}
    replaced = load_quantized_weights(model, scheme, tensors)
    _load_dense(model, tensors, replaced, folder)
    return model.eval()


def _config_dtype(config: object) -> torch.dtype:
    """config.json's ``dtype`` (``torch_dtype`` in older files) as a torch dtype; float32 if unset.

    ``config.torch_dtype`` is not read as an attribute: transformers 5 keeps it as a deprecated alias
    that warns on every access, so only a value stored under that old name is looked up."""
    value = getattr(config, "dtype", None) or vars(config).get("torch_dtype")
    if isinstance(value, str):
        value = getattr(torch, value, None)
    return value if isinstance(value, torch.dtype) and value.is_floating_point else torch.float32


def _load_dense(model: nn.Module, tensors: dict[str, torch.Tensor], replaced: list[str],
                folder: Path) -> None:
    """Load the dense tensors; any parameter left without a value (tied ones aside) is an error."""
    try:
        result = model.load_state_dict(tensors, strict=False)
    except RuntimeError as exc:
        raise InputError(f"{folder}: weights do not fit the model of config.json "
                         f"({str(exc).splitlines()[-1].strip()}): check the folder") from None
    buffers = {name for name, _ in model.named_buffers()}  # non-persistent ones (position_ids) too
    unexpected = [k for k in result.unexpected_keys if k not in buffers]  # those the model recomputes
    if unexpected:
        raise InputError(f"{folder}: tensors {unexpected[:3]} match no parameter of the model of "
                         "config.json: check the folder")
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    state, loaded = model.state_dict(), set(tensors)
    stored = {storage_key(state[k]) for k in loaded if k in state}  # tied weights share one key
    codes = {f"{name}.{buffer}" for name in replaced for buffer in ("qweight", "scale", "zero_point",
                                                                    "tensor_scale")}  # set from parts
    missing = [k for k in result.missing_keys if k not in codes and storage_key(state[k]) not in stored]
    if missing:
        raise InputError(f"{folder}: no stored value for {missing[:3]}: the checkpoint is incomplete")
