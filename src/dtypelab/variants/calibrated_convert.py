"""``convert`` for ``:gptq`` / ``:awq`` formats: load, calibrate, write the compressed-tensors folder.

Variants stage: builds on :mod:`dtypelab.models` (loading the folder, its tokenizer), the calibration
inputs (:mod:`dtypelab.variants.calibration`), ``quantize_model`` and the checkpoint writer
:func:`dtypelab.checkpoint.calibrated.write_calibrated`. A data-free convert streams the source in
constant memory; a calibrated one holds the model once (float32) plus one block's activations, as the
codes depend on the model's outputs.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from ..checkpoint import ConversionResult
from ..checkpoint.calibrated import write_calibrated
from ..errors import InputError
from ..formats import NumberFormat, get_format
from ..models import load
from ..progress import ProgressCallback
from ..quant import MixedPlan, QuantizedLinear, quantize_model
from .calibration import DEFAULT_CALIB_TOKENS, calibration_data


def convert_calibrated(source: str | os.PathLike, destination: str | os.PathLike,
                       to: str | NumberFormat | None = None, *, plan: MixedPlan | None = None,
                       calib_file: str | os.PathLike | None = None, calib_tokens: int = DEFAULT_CALIB_TOKENS,
                       keep: Sequence[str] = (), head: bool = False, force: bool | int = False,
                       allow_pickle: bool = False, progress: ProgressCallback | None = None
                       ) -> ConversionResult:
    """Convert the model folder ``source`` to ``to`` (a ``:gptq`` / ``:awq`` format), or as ``plan`` says
    (a mixed-precision plan naming such formats), at ``destination``.

    Args:
        plan: each planned layer in its format (its data-free layers rounded to nearest, the others
            calibrated, as ``quantize_model`` does); ``to``, ``keep`` and ``head`` are then the plan's.
        calib_file, calib_tokens: the calibration inputs (default: the bundled calibration text).
        keep: module names or globs (``lm_head``, ``*.mlp.*``; a ``.weight`` tensor name means its
            module) left dense.
        head: quantize the output head too (calibrated on one pass of the whole model).
        force: replace an existing destination (see ``convert_checkpoint``).
    Raises:
        InputError: a data-free format or plan (use ``convert_checkpoint``), calibration input problems,
            a plan made for other weights, a folder whose tensor names are not the model's module names.
    """
    spec = _what(to, plan, keep, head)
    loaded = load(os.fspath(source), "fp32", allow_pickle=allow_pickle)
    if plan is not None:
        plan.check_model(loaded.model)
    data = calibration_data(loaded, calib_file, calib_tokens)
    exclude = [pattern.removesuffix(".weight") for pattern in keep]
    result = quantize_model(loaded.model, spec, exclude=exclude, head=head, calibration=data.batches,
                            progress=progress)
    report = result.calibration
    report.source, report.ctx = data.source, data.ctx
    quantized = {name: module.qtensor for name, module in result.model.named_modules()
                 if isinstance(module, QuantizedLinear)}
    dense = {layer.name: layer.reason for layer in result.layers
             if not layer.quantized and layer.kind != "Embedding"}
    fmt = {name: qt.fmt for name, qt in quantized.items()} if plan is not None else spec
    label = {"plan": plan.budget or "file"} if plan is not None else {"format": spec.name}
    return write_calibrated(source, destination, fmt, quantized, report.folded, dense,
                            {**label, **report.summary()}, force=force, scales=report.scales)


def _what(to: str | NumberFormat | None, plan: MixedPlan | None, keep: Sequence[str],
          head: bool) -> NumberFormat | MixedPlan:
    """The one calibrated format, or the plan (which must name one), with the options that fit it."""
    if (to is None) == (plan is None):
        raise InputError("give a calibrated format (to='int4:g64:gptq') or a plan, one of them")
    if plan is not None:
        if keep or head:
            raise InputError("keep / head and a plan: the plan already says which layers are quantized")
        if not any(get_format(f).calibration for f in plan.formats.values()):
            raise InputError("the plan names no :gptq / :awq format: convert it with convert_checkpoint "
                             "(streamed)")
        return plan
    fmt = get_format(to)
    if not fmt.calibration:
        raise InputError(f"{fmt.name} is data-free: convert it with convert_checkpoint (streamed)")
    return fmt
