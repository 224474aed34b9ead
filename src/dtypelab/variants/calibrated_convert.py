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
from ..quant import QuantizedLinear, quantize_model
from .calibration import DEFAULT_CALIB_TOKENS, calibration_data


def convert_calibrated(source: str | os.PathLike, destination: str | os.PathLike, to: str | NumberFormat, *,
                       calib_file: str | os.PathLike | None = None, calib_tokens: int = DEFAULT_CALIB_TOKENS,
                       keep: Sequence[str] = (), head: bool = False, force: bool | int = False,
                       allow_pickle: bool = False, progress: ProgressCallback | None = None
                       ) -> ConversionResult:
    """Convert the model folder ``source`` to ``to`` (a ``:gptq`` / ``:awq`` format) at ``destination``.

    Args:
        calib_file, calib_tokens: the calibration inputs (default: the bundled calibration text).
        keep: module names or globs (``lm_head``, ``*.mlp.*``; a ``.weight`` tensor name means its
            module) left dense.
        head: quantize the output head too (calibrated on one pass of the whole model).
        force: replace an existing destination (see ``convert_checkpoint``).
    Raises:
        InputError: a data-free format (use ``convert_checkpoint``), calibration input problems, a folder
            whose tensor names are not the model's module names.
    """
    fmt = get_format(to)
    if not fmt.calibration:
        raise InputError(f"{fmt.name} is data-free: convert it with convert_checkpoint (streamed)")
    loaded = load(os.fspath(source), "fp32", allow_pickle=allow_pickle)
    data = calibration_data(loaded, calib_file, calib_tokens)
    exclude = [pattern.removesuffix(".weight") for pattern in keep]
    result = quantize_model(loaded.model, fmt, exclude=exclude, head=head, calibration=data.batches,
                            progress=progress)
    report = result.calibration
    report.source, report.ctx = data.source, data.ctx
    quantized = {name: module.qtensor for name, module in result.model.named_modules()
                 if isinstance(module, QuantizedLinear)}
    dense = {layer.name: layer.reason for layer in result.layers
             if not layer.quantized and layer.kind != "Embedding"}
    settings = {"format": fmt.name, **report.summary()}
    return write_calibrated(source, destination, fmt, quantized, report.folded, dense, settings, force=force,
                            scales=report.scales)
