"""``cast_model``: a copy of a model in another floating dtype, with modules kept in float32 on request.

The copy is built tensor by tensor: every parameter and buffer is cast straight from the original
into the new dtype and handed to ``copy.deepcopy`` through its memo, so the module tree is copied but
no float32 duplicate of the weights is ever made. Tied tensors stay tied in the copy.

Quant stage (putting a model into a format: this for plain dtypes, :mod:`dtypelab.quant.model` for
scaled ones). It sits below :mod:`dtypelab.models` because loading a built-in straight into a dtype
goes through this same cast.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import InputError, UnknownFormatError
from ..formats import NumberFormat, get_format
from ..naming import any_matches, did_you_mean_names, inside_any, is_glob
from ..tree import map_floating, modules_sharing_with, own_tensors


@dataclass(frozen=True)
class KeepPolicy:
    """Modules to keep in a higher-precision dtype (default float32) while the rest is cast.

    Args:
        module_types: class names (``"LayerNorm"``) or classes; subclasses match too.
        name_patterns: globs on qualified module names (``"head"``, ``"*.layernorm_*"``).
        dtype: the dtype kept modules hold and compute in.

    A kept module keeps all its submodules, and a module tied to it (an embedding sharing the kept
    head's weight) is kept whole too. Casts happen only at the boundary between kept and cast regions:
    a kept module casts its floating inputs to ``dtype`` and hands its output on in ``dtype``; a cast
    module casts the floating inputs it receives to the model's dtype. So adjacent kept modules pass
    float32 to each other ("a big Linear and the norm after it in float32" never round-trips through
    fp16 between them), and a kept output head returns float32 logits.
    """

    module_types: tuple[type | str, ...] = ()
    name_patterns: tuple[str, ...] = ()
    dtype: torch.dtype = torch.float32

    @classmethod
    def from_strings(cls, items: Sequence[str]) -> KeepPolicy:
        """``["LayerNorm", "head*"]``: capitalised words without glob characters are class names.

        Raises:
            InputError: an empty item (it would match the model itself and keep everything).
        """
        if not all(item.strip() for item in items):
            raise InputError(f"empty --keep item in {list(items)!r}: give a class name (LayerNorm) or a "
                             "module name glob (lm_head, *.norm)")
        types = tuple(i for i in items if i[:1].isupper() and not is_glob(i) and "." not in i)
        return cls(types, tuple(i for i in items if i not in types))

    def matches(self, name: str, module: nn.Module) -> bool:
        """Whether the module at qualified ``name`` is kept: its class (or a base) or its name matches, or
        a pattern names one of its own tensors (``lm_head.weight``, as ``convert --keep`` takes them)."""
        for kind in self.module_types:
            if isinstance(kind, str) and kind in (name, *(c.__name__ for c in type(module).__mro__)):
                return True
            if isinstance(kind, type) and isinstance(module, kind):
                return True
        tensors = [f"{name}.{n}" if name else n for n, _ in module.named_parameters(recurse=False)]
        tensors += [f"{name}.{n}" if name else n for n, _ in module.named_buffers(recurse=False)]
        return any(any_matches(n, self.name_patterns) for n in (name, *tensors))

    def kept_roots(self, model: nn.Module) -> list[str]:
        """Qualified names of the outermost kept modules (their children are kept with them).

        Raises:
            InputError: a class or name pattern that matches no module (a typo would keep nothing).
        """
        roots: list[str] = []
        for name, module in model.named_modules():
            if not inside_any(name, roots) and self.matches(name, module):
                roots.append(name)
        self._check_all_match(model)
        return roots

    def _check_all_match(self, model: nn.Module) -> None:
        modules = list(model.named_modules())
        for item in [*self.module_types, *self.name_patterns]:
            single = KeepPolicy((item,), ()) if item in self.module_types else KeepPolicy((), (item,))
            if not any(single.matches(name, module) for name, module in modules):
                label = item.__name__ if isinstance(item, type) else item
                known = [name for name, _ in modules if name] + [type(m).__name__ for _, m in modules]
                raise InputError(f"--keep {label!r} matches no module of the model (neither a class nor a "
                                 f"name){did_you_mean_names(label, known)}: check the names with "
                                 "`dtypelab inspect`")


def cast_model(model: nn.Module, fmt: str | torch.dtype | NumberFormat,
               keep: KeepPolicy | None = None) -> nn.Module:
    """Return a copy of ``model`` with floating tensors in ``fmt``; ``model`` is not modified.

    Integer and boolean buffers are copied unchanged. As transformers' ``from_pretrained(dtype=…)``
    does, buffers the model computes itself (non-persistent: rotary ``inv_freq``) keep their dtype and
    the modules the model class lists in ``_keep_in_fp32_modules`` stay float32, so a cast model is the
    model transformers would run in ``fmt``. With ``keep``, the modules it matches stay in
    ``keep.dtype`` and the forward casts at the boundaries between kept and cast regions (see
    :class:`KeepPolicy`).

    Example:
        >>> cast_model(DummyModel(), "bf16").head.weight.dtype
        torch.bfloat16
    """
    target = compute_dtype(fmt)
    keep = keep or KeepPolicy()
    roots = modules_sharing_with(model, keep.kept_roots(model))
    new_model = copy.deepcopy(model, _cast_memo(model, target, roots, keep.dtype))
    if roots:
        _add_boundary_casts(new_model, roots, keep.dtype, target)
    return new_model


def compute_dtype(fmt: str | torch.dtype | NumberFormat) -> torch.dtype:
    """The torch dtype a model can hold and compute in for ``fmt`` (fp32, fp16, bf16), or a clear error.

    Raises:
        UnknownFormatError: an unknown name, or an 8-bit or smaller format (those take quantize).
    """
    fmt = get_format(fmt)
    if not fmt.is_floating_point or fmt.torch_dtype is None or fmt.torch_dtype.itemsize < 2:
        raise UnknownFormatError(f"cannot compute in {fmt.name}: cast takes a floating compute dtype "
                                 "(fp32, fp16, bf16); 8-bit and smaller formats are quantized: "
                                 "compare --to int8, dtypelab.quantize_model")
    return fmt.torch_dtype


def _cast_memo(model: nn.Module, target: torch.dtype, roots: list[str], kept: torch.dtype) -> dict:
    """Map id(original tensor) -> its cast copy: ``kept`` inside ``roots``, ``target`` elsewhere; the
    model's own float32 modules and its computed buffers as transformers keeps them."""
    memo: dict[int, torch.Tensor] = {}
    fp32_modules = _keep_in_fp32_modules(model)
    for name, module in model.named_modules():
        in_fp32 = any(part in fp32_modules for part in name.split("."))
        dtype = kept if inside_any(name, roots) else torch.float32 if in_fp32 else target
        computed = {id(b) for n, b in module.named_buffers(recurse=False)
                    if n in getattr(module, "_non_persistent_buffers_set", ())}
        for tensor in own_tensors(module):
            if id(tensor) not in memo:  # tied: one copy, so the copy stays tied
                memo[id(tensor)] = _cast_tensor(tensor, tensor.dtype if id(tensor) in computed else dtype)
    return memo


def _keep_in_fp32_modules(model: nn.Module) -> set[str]:
    """The module names a transformers model class keeps in float32 whatever the dtype (T5's ``wo``)."""
    names: set[str] = set()
    for attribute in ("_keep_in_fp32_modules", "_keep_in_fp32_modules_strict"):
        names.update(getattr(model, attribute, None) or ())
    return names


def _cast_tensor(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A new tensor (never a view of the original): floating ones in ``dtype``, others as they are."""
    data = tensor.detach().to(dtype if tensor.is_floating_point() else tensor.dtype, copy=True)
    if isinstance(tensor, nn.Parameter):
        return nn.Parameter(data, requires_grad=tensor.requires_grad)
    return data


class _CastInputs:
    """Forward pre-hook: floating positional and keyword inputs to ``dtype``."""

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple:
        return map_floating(args, self.dtype), map_floating(kwargs, self.dtype)


def _add_boundary_casts(model: nn.Module, roots: list[str], kept: torch.dtype, target: torch.dtype) -> None:
    """Kept roots take their inputs in ``kept``; every cast-region module that holds tensors takes its
    inputs in ``target``. Outputs are left as computed, so a kept output reaches a kept consumer as it
    is and a cast consumer casts it on the way in (modules holding no tensor — activations, containers —
    compute in what they receive)."""
    for name, module in model.named_modules():
        if name in roots:
            module.register_forward_pre_hook(_CastInputs(kept), with_kwargs=True)
        elif not inside_any(name, roots) and own_tensors(module):
            module.register_forward_pre_hook(_CastInputs(target), with_kwargs=True)
