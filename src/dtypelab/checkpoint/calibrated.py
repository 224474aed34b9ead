"""Writing a calibrated (``:gptq`` / ``:awq``) model as a compressed-tensors checkpoint.

Checkpoint stage: builds on :mod:`dtypelab.checkpoint.layouts`, ``staging`` and ``writer``. A calibrated
format's codes depend on the model's activations, so they cannot be streamed from the source file row
chunk by row chunk as :func:`~dtypelab.checkpoint.convert.convert_checkpoint` does: the model is loaded,
calibrated (``variants.convert_calibrated`` does both) and its layers' :class:`QuantizedTensor` s handed
here, with the tensors AWQ changed (norm weights that absorbed its scales). Every other tensor is copied
from the source as stored. The output is what llm-compressor writes for the same scheme: the same
compressed-tensors layout as a data-free convert (static groups, no ``g_idx``: no act-order), a
``quantization_config`` listing the dense Linear layers in ``ignore``, and the calibration settings under
``dtypelab_calibration`` in config.json. Complete or absent, as every convert.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

import torch

from ..errors import InputError
from ..formats import NumberFormat
from ..quant import Action, QuantizedTensor, TensorDamage, dtype_name, quantization_damage
from .convert import ConversionResult, _extra_files
from .layouts import check_supported, quantization_config, to_parts
from .safetensors_file import open_checkpoint
from .staging import StagedOutput
from .writer import read_config

OUTPUT_FILE = "model.safetensors"
CALIBRATION_KEY = "dtypelab_calibration"
CALIBRATED_CAUTION = ("{method}: each quantized tensor's counts compare its codes with the source weights "
                      "(AWQ: times its input scales); calibration moves weights on purpose (GPTQ pushes each "
                      "column's error onto the next), so clipped and flushed values are expected; the "
                      "figure it minimises is the layer's output error, in config.json's "
                      f"{CALIBRATION_KEY}")


def write_calibrated(source: str | os.PathLike, destination: str | os.PathLike,
                     fmt: NumberFormat | Mapping[str, NumberFormat],
                     quantized: Mapping[str, QuantizedTensor], replaced: Mapping[str, torch.Tensor],
                     dense_layers: Mapping[str, str], settings: dict, *, force: bool = False,
                     scales: Mapping[str, torch.Tensor] | None = None) -> ConversionResult:
    """Write ``source`` (a model folder) to ``destination`` with the layers ``quantized`` (module name ->
    its tensor, (out, in)) stored in their layout and the tensors ``replaced`` (tensor name -> values)
    instead of the source's. ``scales``: AWQ's per-input scales of the layers whose codes hold W·s (the
    damage of such a layer is counted against W·s, what its codes round). ``fmt``: the one format, or
    for a mixed-precision plan each quantized layer's (one config group per scheme).

    Raises:
        InputError: a single-file source, a layer whose ``.weight`` the checkpoint lacks, a format with no
            compressed-tensors layout.
    """
    per_layer = dict(fmt) if isinstance(fmt, Mapping) else None
    for each in set((per_layer or {}).values()) if per_layer else [fmt]:
        check_supported(each)
    src, dst = open_checkpoint(source), Path(destination)
    if src.folder is None:
        raise InputError(f"{source}: a calibrated convert needs the model folder (config.json, tokenizer), "
                         "not a single .safetensors file")
    names = {entry.name for shard in src.shards for entry in shard.tensors}
    missing = [f"{layer}.weight" for layer in quantized if f"{layer}.weight" not in names]
    missing += [name for name in replaced if name not in names]
    if missing:
        raise InputError(f"{source}: the loaded model's {missing[0]} is not a tensor of the checkpoint: "
                         "convert a folder whose tensor names are the model's module names")
    tensors, damage, read = _output_tensors(src, quantized, replaced, scales or {})
    with StagedOutput(dst, force, src.path) as staging:
        extra, skipped = _extra_files(src)
        from safetensors.torch import save_file  # imported when used: `dtypelab --help` stays light

        save_file(tensors, str(staging.tmp / OUTPUT_FILE), metadata={"format": "pt"})
        qconfig = quantization_config(per_layer if per_layer else fmt, sorted(dense_layers))
        copied = _copy_extra(src.folder, extra, staging.tmp, qconfig, settings)
        staging.commit(False)
    written = (dst / OUTPUT_FILE).stat().st_size
    formats = sorted({f.name for f in per_layer.values()}) if per_layer else [fmt.name]
    methods = sorted({f.calibration for f in (per_layer or {}).values() if f.calibration}) if per_layer \
        else [fmt.calibration]
    name = "plan: " + "+".join(formats) if per_layer else fmt.name
    return ConversionResult(src.path, dst, name, [OUTPUT_FILE], None, damage, copied,
                            [str(p.relative_to(src.folder)) for p in skipped], True, read, written, False,
                            dict(dense_layers),
                            cautions=[CALIBRATED_CAUTION.format(method="+".join(methods))])


def _output_tensors(src, quantized: Mapping[str, QuantizedTensor], replaced: Mapping[str, torch.Tensor],
                    scales: Mapping[str, torch.Tensor]):
    """(name -> tensor to write, damage per source tensor, bytes read), in the source's order."""
    tensors: dict[str, torch.Tensor] = {}
    damage: list[TensorDamage] = []
    read = 0
    layers = {f"{layer}.weight": layer for layer in quantized}
    from safetensors import safe_open  # imported when used: `dtypelab --help` stays light

    for shard in src.shards:
        with safe_open(str(shard.path), framework="pt") as handle:
            for entry in shard.tensors:
                value = handle.get_tensor(entry.name)
                read += value.numel() * value.element_size()
                if entry.name in layers:
                    layer = layers[entry.name]
                    damage.append(_store_layer(tensors, layer, value, quantized[layer], scales.get(layer)))
                    continue
                written = replaced.get(entry.name, value).to(value.dtype).contiguous()
                tensors[entry.name] = written
                action = Action.CAST if entry.name in replaced else Action.COPIED
                damage.append(TensorDamage(entry.name, dtype_name(value.dtype), dtype_name(written.dtype),
                                           action, value.numel()))
    return tensors, damage, read


def _store_layer(tensors: dict, layer: str, weight: torch.Tensor, qt: QuantizedTensor,
                 scales: torch.Tensor | None) -> TensorDamage:
    """The layer's parts under ``layer.<suffix>``; its damage against what its codes round: the source
    weight (out, in), times AWQ's scales when it has them."""
    for suffix, part in to_parts(qt).items():
        tensors[f"{layer}.{suffix}"] = part.contiguous()
    source = (weight if tuple(weight.shape) == qt.shape else weight.t()).float()
    counted = quantization_damage(source * scales if scales is not None else source, qt)
    return TensorDamage(f"{layer}.weight", dtype_name(weight.dtype), qt.fmt.name, Action.QUANTIZED,
                        weight.numel(), counted.overflowed, counted.flushed_to_zero, counted.subnormal,
                        counted.max_rel_error, (), counted.signal_sq, counted.noise_sq, counted.max_flushed)


def _copy_extra(folder: Path, extra: list[Path], staged: Path, qconfig: dict, settings: dict) -> list[str]:
    """Copy the folder's other files; config.json gains the quantization config and the calibration."""
    copied = []
    for path in extra:
        target = staged / path.relative_to(folder)
        target.parent.mkdir(parents=True, exist_ok=True)
        if path.parent == folder and path.name == "config.json":
            config = read_config(path)
            config["quantization_config"], config[CALIBRATION_KEY] = qconfig, settings
            target.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        else:
            target.write_bytes(path.read_bytes())
            copied.append(str(path.relative_to(folder)))
    return copied
