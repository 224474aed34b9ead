"""Running a model for measurement: the one runner, which output is compared, which modules are hooked.

Analysis stage. Every forward dtypelab measures goes through :func:`run_model`, so compare, the
layer-wise lock-step, headroom and the noise floors feed models alike.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from ..errors import InputError
from ..naming import any_matches, did_you_mean_names


@torch.no_grad()  # not inference_mode: quanto's int4 tensors fail under it ("version_counter")
def run_model(model: nn.Module, inputs: torch.Tensor | Mapping[str, torch.Tensor]) -> object:
    """One forward pass: the one runner every measurement uses (compare, layers, headroom, floors).

    On :func:`own_inputs` in the model's dtype (a model writing into its input leaves the caller's
    alone); a mapping of inputs is passed as keyword arguments; without a key/value cache when the
    forward takes ``use_cache`` (a re-run layer would otherwise append twice, and nothing measured here
    reads the cache); without autograd.
    """
    inputs = own_inputs(inputs, input_dtype(model))
    kwargs = dict(inputs) if isinstance(inputs, Mapping) else {}
    if "use_cache" in inspect.signature(model.forward).parameters:
        kwargs.setdefault("use_cache", False)
    return model(**kwargs) if isinstance(inputs, Mapping) else model(inputs, **kwargs)


def batch_rows(inputs: torch.Tensor | Mapping[str, torch.Tensor]) -> int | None:
    """How many rows (sentences, windows) the inputs hold along dimension 0, or None when they cannot be
    split there: a 0-d tensor, or keyword tensors that disagree on their first dimension."""
    tensors = [inputs] if isinstance(inputs, torch.Tensor) else \
        [v for v in inputs.values() if isinstance(v, torch.Tensor)]
    sizes = {t.shape[0] if t.dim() else None for t in tensors}
    return sizes.pop() if len(sizes) == 1 else None


def split_rows(inputs: torch.Tensor | Mapping[str, torch.Tensor], rows: int
               ) -> list[torch.Tensor | dict[str, object]]:
    """The inputs in consecutive runs of ``rows`` rows (the last may be shorter); a keyword argument
    that is not a tensor goes to every run whole. Views, not copies."""
    if isinstance(inputs, torch.Tensor):
        return list(inputs.split(rows))
    total = batch_rows(inputs)
    return [{k: v[start:start + rows] if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
            for start in range(0, total, rows)]


def select_output(output: object, name: str | None = None) -> torch.Tensor:
    """The tensor to compare from a model's output: the tensor itself, or a named field of an
    output object / dict (default: ``logits``, else ``last_hidden_state``, else the first tensor)."""
    return named_output(output, name)[1]


def named_output(output: object, name: str | None) -> tuple[str, torch.Tensor]:
    if isinstance(output, torch.Tensor) and name in (None, "output"):
        return "output", output
    fields = dict(output) if isinstance(output, Mapping) else {}
    if not fields and isinstance(output, tuple | list):
        fields = {str(i): v for i, v in enumerate(output)}
    for key in ([name] if name else ["logits", "last_hidden_state", *fields]):
        if isinstance(fields.get(key), torch.Tensor):
            return key, fields[key]
    names = ", ".join(k for k, v in fields.items() if isinstance(v, torch.Tensor))
    raise InputError(f"model output has no tensor {name!r}: choose --output from "
                     f"{names or '(none: the model returns one tensor; leave --output out)'}")


def is_logits_output(output: object, output_kind: str) -> bool:
    if output_kind != "auto":
        return output_kind == "logits"
    return isinstance(output, Mapping) and "logits" in output


def input_dtype(model: nn.Module) -> torch.dtype | None:
    """The dtype floating inputs (embeddings fed with ``--input-file``) are given to ``model``: its
    first floating parameter's, as a cast model computes in it (None: no floating parameter)."""
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), None)


def own_inputs(inputs: torch.Tensor | Mapping[str, torch.Tensor],
               dtype: torch.dtype | None = None) -> torch.Tensor | dict[str, torch.Tensor]:
    """The inputs with floating tensors copied, in ``dtype`` when given (ids and masks are shared): a
    model that writes into its input would otherwise change the caller's tensors and what the next
    model compared is given."""
    def own(value: object) -> object:
        if not (isinstance(value, torch.Tensor) and value.is_floating_point()):
            return value
        return value.to(dtype, copy=True) if dtype is not None else value.clone()
    return {k: own(v) for k, v in inputs.items()} if isinstance(inputs, Mapping) else own(inputs)


def select_layers(model: nn.Module, depth: int | None = None, patterns: Sequence[str] = ()) -> list[str]:
    """Qualified names of the modules to compare (the model itself is always measured as ``final``).

    Args:
        depth: keep modules at most this many name components deep (``layers.0`` is depth 2).
        patterns: globs on qualified names (``"layers.*.mlp"``); any one matching selects a module.

    Returns:
        Selected names in registration order; every module but the root when nothing is given.
    """
    if depth is not None and depth < 1:
        raise InputError(f"--depth {depth} selects nothing: use 1 for top-level modules, more to go deeper")
    names = [name for name, _ in model.named_modules() if name]
    if depth is not None:
        names = [n for n in names if n.count(".") < depth]
    if patterns:
        every, names = names, [n for n in names if any_matches(n, patterns)]
        for pattern in [] if names else patterns:  # the closest names of what the user typed
            raise InputError(f"no module matches --select {pattern!r}{did_you_mean_names(pattern, every)}: "
                             "list the names with 'dtypelab inspect MODEL' and pick a pattern such as "
                             "'layers.*'")
    if not names:
        raise InputError(f"no module matches depth={depth} / patterns={list(patterns)}: list the names with "
                         "'dtypelab inspect MODEL' and pick a pattern such as 'layers.*'")
    return names
