"""The sequential calibration pipeline: a model's layers quantized by GPTQ or AWQ, block after block.

Quant stage: builds on :mod:`dtypelab.quant.gptq`, :mod:`dtypelab.quant.awq` and :mod:`dtypelab.quant.nn`.
It takes calibration *inputs* (batches of the model's keyword arguments or tensors, already tokenised:
the text and the tokenizer belong to the models stage, :mod:`dtypelab.variants.calibration` cuts them), so
it sits below ``models/`` and ``quantize_model`` can use it. As llm-compressor's sequential pipeline:

1. the model runs once per batch up to its first block (the ``nn.ModuleList`` holding most of the layers
   to quantize: a transformer's decoder or encoder layers), whose inputs are kept;
2. each block in turn runs on those inputs with hooks summing its layers' input statistics
   (:class:`~dtypelab.quant.hessian.InputStats`); its layers are quantized (GPTQ: per layer; AWQ: layers
   sharing one input together, the scale folded into the norm that produced it); the block runs again,
   quantized, and its outputs are the next block's inputs (so later blocks calibrate on the quantized
   model's activations);
3. layers outside every block (an output head with ``head=True``) are calibrated last, on one hooked
   pass of the whole, by then quantized, model.

Peak memory is one block's inputs and outputs for every batch plus one block's statistics, not the
model's activations. Embedding tables have no input activations: they are rounded to nearest, and the
report says so. Every layer's output SQNR on its calibration inputs is measured beside round to nearest's.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import InputError
from ..formats import NumberFormat
from ..progress import ProgressCallback, stage
from ..report import Table, TableMixin
from ..tree import set_submodule
from .awq import channel_scales, clip_quantize, scaled_hessian, search_scales
from .gptq import gptq_quantize
from .hessian import InputStats, output_sqnr_db
from .nn import QuantizedLinear, is_conv1d
from .qtensor import QuantizedTensor, round_trip

FOLD_TOLERANCE = 1e-4  # relative change of a block's output that a fold may cause: float32 reassociation
Batch = Mapping[str, torch.Tensor] | torch.Tensor


@dataclass(frozen=True)
class LayerCalibration:
    """One layer's calibration: method, output SQNR (dB) on its calibration inputs against round to
    nearest's, AWQ's α and the norm its scales were folded into, GPTQ's damping and dead inputs."""

    name: str
    method: str
    sqnr_db: float
    rtn_sqnr_db: float
    alpha: float | None = None
    folded_into: str = ""
    damp_ratio: float | None = None
    dead_inputs: int = 0
    note: str = ""


@dataclass
class CalibrationReport(TableMixin):
    """What a calibrated quantization did: method, tokens, blocks, threads, time, every layer; for AWQ
    the norm tensors it changed (``folded``: tensor name -> new values) and each folded layer's input
    scales (``scales``: its codes hold W·s)."""

    method: str
    tokens: int
    batches: int
    blocks: int
    threads: int
    seconds: float = 0.0
    layers: list[LayerCalibration] = field(default_factory=list)
    folded: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    scales: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)  # AWQ: layer -> s (in,)
    source: str = ""  # where the batches came from (set by whoever cut them: the bundled text, a file)
    ctx: int = 0  # tokens per window (0: a tensor file's own shape)

    @property
    def median_gain_db(self) -> float | None:
        """Median over layers of (calibrated − round-to-nearest) output SQNR on the calibration inputs."""
        gains = sorted(layer.sqnr_db - layer.rtn_sqnr_db for layer in self.layers
                       if math.isfinite(layer.sqnr_db) and math.isfinite(layer.rtn_sqnr_db))
        return gains[len(gains) // 2] if gains else None

    def summary(self) -> dict:
        """The settings and headline figures without the per-layer rows (``compare --json``)."""
        gain = self.median_gain_db
        return {"method": self.method, "source": self.source, "tokens": self.tokens, "ctx": self.ctx,
                "batches": self.batches, "blocks": self.blocks, "threads": self.threads,
                "seconds": round(self.seconds, 3), "layers": len(self.layers),
                "median_gain_db": None if gain is None else round(gain, 3)}

    def note(self) -> str:
        """One line for a comparison table's notes."""
        gain = self.median_gain_db
        where = f"{self.source}, " if self.source else ""
        return (f"{self.method} on {self.tokens:,} calibration tokens ({where}{self.batches} batch(es)), "
                f"{self.blocks} block(s) in sequence, {self.threads} thread(s), {self.seconds:.1f} s"
                + ("" if gain is None else f"; layer outputs on the calibration inputs: median "
                   f"{gain:+.2f} dB SQNR over round to nearest"))

    def to_table(self) -> Table:
        rows = [[layer.name, layer.method, layer.rtn_sqnr_db, layer.sqnr_db,
                 "" if layer.alpha is None else layer.alpha, layer.folded_into, layer.note]
                for layer in self.layers]
        notes = [f"{self.method} on {self.tokens} calibration tokens in {self.batches} batch(es), "
                 f"{self.blocks} block(s) in sequence, {self.threads} thread(s), {self.seconds:.1f} s; "
                 "sqnr_db: each layer's output on its calibration inputs"]
        return Table("calibration", ["layer", "method", "rtn_sqnr_db", "sqnr_db", "alpha", "folded_into",
                                     "note"], rows, notes)

    def to_dict(self) -> dict:
        """The settings and per-layer figures, for a checkpoint's config."""
        return {**self.summary(), "layers": [dataclasses.asdict(layer) for layer in self.layers]}


def calibrate_layers(model: nn.Module, fmt: NumberFormat | Mapping[str, NumberFormat], names: Sequence[str],
                     batches: Sequence[Batch],
                     progress: ProgressCallback | None = None) -> tuple[dict[str, str], CalibrationReport]:
    """Quantize the Linear / Conv1D layers ``names`` of ``model`` in place by ``fmt.calibration``.

    ``fmt`` is one format for every layer, or (a mixed-precision plan) a format per layer name, each a
    ``:gptq`` or ``:awq`` one: GPTQ layers are calibrated one by one, AWQ layers reading one input
    together when they share a format (layers of other formats on that input keep the norm unscaled, so
    such a group is clipped only, and says so). Layers not in ``names`` are left as they are: a plan's
    data-free layers, quantized beforehand, run quantized in the blocks that calibrate the next ones.

    Returns:
        (reasons, report): ``reasons`` maps each layer that stayed dense to why (a group size that does
        not divide it, a singular Hessian ...); the report holds every quantized layer's figures and the
        norm weights AWQ changed (``report.folded``: name -> new tensor).
    Raises:
        InputError: no batches, or a forward that fails on them.
    """
    if not batches:
        raise InputError(f"{fmt.name} needs calibration inputs: give at least one batch")
    start = time.perf_counter()
    formats = dict(fmt) if isinstance(fmt, Mapping) else dict.fromkeys(names, fmt)
    blocks = find_blocks(model, names)
    method = "+".join(sorted({formats[n].calibration for n in names})) or "none"
    report = CalibrationReport(method, batch_tokens(batches), len(batches), len(blocks),
                               torch.get_num_threads())
    reasons: dict[str, str] = {}
    bar = stage(progress, "calibration", "blocks", len(blocks) + 1)
    inside = set()
    if blocks:
        inputs = _block_inputs(model, blocks[0][1], batches)
        for prefix, block in blocks:
            members = [n for n in names if n.startswith(prefix + ".")]
            inside.update(members)
            _calibrate_block(model, block, prefix, members, inputs, formats, reasons, report)
            inputs = [_next_inputs(block, args, kwargs) for args, kwargs in inputs]
            bar.advance(detail=prefix)
    rest = [n for n in names if n not in inside]
    if rest:
        _calibrate_rest(model, rest, batches, formats, reasons, report)
    bar.advance(detail="rest")
    report.seconds = time.perf_counter() - start
    return reasons, report


def find_blocks(model: nn.Module, names: Sequence[str]) -> list[tuple[str, nn.Module]]:
    """(name, module) of each block, in order: the children of the ``nn.ModuleList`` that holds the most
    of ``names`` (ties: the first); empty when no list holds any."""
    best, best_count = None, 0
    for list_name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and list_name:
            count = sum(n.startswith(list_name + ".") for n in names)
            if count > best_count:
                best, best_count = (list_name, module), count
    if best is None:
        return []
    return [(f"{best[0]}.{index}", child) for index, child in enumerate(best[1])]


class _Stop(Exception):
    """Raised by the hook on the first block: the rest of the model need not run."""


@torch.no_grad()
def _block_inputs(model: nn.Module, first: nn.Module, batches: Sequence[Batch]) -> list[tuple[tuple, dict]]:
    """(args, kwargs) the first block receives for each batch."""
    captured: list[tuple[tuple, dict]] = []

    def hook(module, args, kwargs):
        captured.append((args, kwargs))
        raise _Stop

    handle = first.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for batch in batches:
            try:
                _forward(model, batch)
            except _Stop:
                continue
            raise InputError("calibration: the model ran without calling its first block: give the model's "
                             "own inputs")
    finally:
        handle.remove()
    return captured


def _forward(model: nn.Module, batch: Batch) -> object:
    """One forward without a key/value cache (as ``analysis.run.run_model`` runs it)."""
    if isinstance(batch, torch.Tensor):
        return model(batch)
    kwargs = dict(batch)
    if "use_cache" in inspect.signature(model.forward).parameters:
        kwargs.setdefault("use_cache", False)
    return model(**kwargs)


@torch.no_grad()
def _next_inputs(block: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """The next block's (args, kwargs): this block's first output in place of its first argument."""
    return (_first(block(*args, **kwargs)), *args[1:]), kwargs


def _first(output: object) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


@torch.no_grad()
def _calibrate_block(model: nn.Module, block: nn.Module, prefix: str, members: list[str],
                     inputs: list[tuple[tuple, dict]], formats: Mapping[str, NumberFormat],
                     reasons: dict[str, str], report: CalibrationReport) -> None:
    """Statistics of ``members`` over every input, then each layer (or AWQ group) quantized."""
    layers = {name: model.get_submodule(name) for name in members}
    stats, groups = _hooked_run(block, prefix, layers, lambda run: [run(a, k) for a, k in inputs])
    for group in groups:
        for fmt, same in _by_format(group, formats):
            if fmt.calibration == "awq":
                _awq_group(model, block, same, layers, stats, inputs[0], fmt, reasons, report)
                continue
            for name in same:
                _gptq_layer(model, name, layers[name], stats[name], fmt, reasons, report)


def _by_format(group: list[str], formats: Mapping[str, NumberFormat]) -> list[tuple[NumberFormat, list[str]]]:
    """The layers of one shared-input group split by format, in order of first appearance."""
    split: dict[str, tuple[NumberFormat, list[str]]] = {}
    for name in group:
        split.setdefault(formats[name].name, (formats[name], []))[1].append(name)
    return list(split.values())


def _calibrate_rest(model: nn.Module, names: list[str], batches: Sequence[Batch],
                    formats: Mapping[str, NumberFormat], reasons: dict[str, str],
                    report: CalibrationReport) -> None:
    """Layers outside every block, on one hooked pass of the whole model (AWQ: clipping only)."""
    layers = {name: model.get_submodule(name) for name in names}
    stats, _ = _hooked_run(model, "", layers, lambda run: [_forward(model, b) for b in batches])
    for name in names:
        if formats[name].calibration == "awq":
            _awq_group(model, None, [name], layers, stats, None, formats[name], reasons, report)
        else:
            _gptq_layer(model, name, layers[name], stats[name], formats[name], reasons, report)


def _hooked_run(root: nn.Module, prefix: str, layers: dict[str, nn.Module],
                drive: Callable) -> tuple[dict[str, InputStats], list[list[str]]]:
    """Run ``drive`` with hooks summing each layer's input statistics; also returns the layers grouped
    by the input tensor they share (on the first call: layers fed the very same tensor)."""
    stats = {name: InputStats(_in_features(module)) for name, module in layers.items()}
    first_inputs: dict[str, torch.Tensor] = {}

    def hook_for(name):
        def hook(module, args):
            stats[name].add(args[0])
            first_inputs.setdefault(name, args[0])
        return hook

    handles = [module.register_forward_pre_hook(hook_for(name)) for name, module in layers.items()]
    try:
        drive(lambda args, kwargs: root(*args, **kwargs))
    finally:
        for handle in handles:
            handle.remove()
    return stats, _shared_input_groups(first_inputs, list(layers))


def _shared_input_groups(first_inputs: dict[str, torch.Tensor], names: list[str]) -> list[list[str]]:
    groups: list[list[str]] = []
    for name in names:
        same = next((g for g in groups if first_inputs.get(g[0]) is first_inputs.get(name)
                     and name in first_inputs), None)
        if same is None:
            groups.append([name])
        else:
            same.append(name)
    return groups


NOT_RUN_REASON = "never called on the calibration inputs, so there is nothing to calibrate it on"


def _gptq_layer(model: nn.Module, name: str, module: nn.Module, stats: InputStats, fmt: NumberFormat,
                reasons: dict[str, str], report: CalibrationReport) -> None:
    if not stats.tokens:
        reasons[name] = NOT_RUN_REASON
        return
    weight = _weight(module)
    try:
        result = gptq_quantize(weight, stats.hessian, fmt)
    except InputError as err:
        reasons[name] = str(err)
        return
    hessian = stats.hessian
    report.layers.append(LayerCalibration(
        name, "gptq", output_sqnr_db(weight, result.qtensor.dequantize(), hessian),
        _rtn_sqnr(weight, hessian, fmt), damp_ratio=result.damp_ratio, dead_inputs=result.dead_inputs,
        note=f"{result.dead_inputs} dead input(s): columns zeroed" if result.dead_inputs else ""))
    _replace(model, name, module, result.qtensor)


def _awq_group(model: nn.Module, block: nn.Module | None, group: list[str], layers: dict[str, nn.Module],
               stats: dict[str, InputStats], sample: tuple[tuple, dict] | None, fmt: NumberFormat,
               reasons: dict[str, str], report: CalibrationReport) -> None:
    """AWQ on layers sharing one input: scales searched and folded when a norm produced the input and
    absorbs them (checked on the block's output), else clipping only (α = 0)."""
    first = stats[group[0]]
    if not first.tokens:
        reasons.update(dict.fromkeys(group, NOT_RUN_REASON))
        return
    hessian, weights = first.hessian, [_weight(layers[name]) for name in group]
    problems = [fmt.group_problem(w.shape[1]) for w in weights]
    if any(problems):
        reasons.update({name: p for name, p in zip(group, problems, strict=True) if p})
        return
    norm = _foldable_norm(model, block, group, layers, first, sample)
    found = search_scales(weights, hessian, first.abs_mean, fmt) if norm else None
    alpha, scales = (found.alpha, found.scales) if found else (0.0, torch.ones(hessian.shape[0]))
    if norm and alpha > 0:
        _fold(model.get_submodule(norm), scales, report, norm)
    scaled = scaled_hessian(hessian, scales)
    for name, weight in zip(group, weights, strict=True):
        qt = clip_quantize(weight * scales, scaled, fmt)
        effective = qt.dequantize() / scales
        report.layers.append(LayerCalibration(
            name, "awq", output_sqnr_db(weight, effective, hessian), _rtn_sqnr(weight, hessian, fmt),
            alpha=alpha, folded_into=norm if alpha > 0 else "",
            note="" if norm else "input not from a norm that absorbs a scale (or read by layers in "
                                 "another format too): clipping only"))
        if alpha > 0:
            report.scales[name] = scales
        _replace(model, name, layers[name], qt)


def _foldable_norm(model: nn.Module, block: nn.Module | None, group: list[str], layers: dict[str, nn.Module],
                   stats: InputStats, sample: tuple[tuple, dict] | None) -> str:
    """The name of the norm whose output feeds ``group`` and that can absorb 1/s: its output is the very
    tensor the layers read, and dividing its weight by s while scaling the layers by s leaves the block's
    output unchanged on a calibration batch. "" when there is none."""
    if block is None or sample is None:
        return ""
    candidate = _producer_norm(model, block, group[0], layers, sample)
    if not candidate:
        return ""
    trial = channel_scales(stats.abs_mean, 0.5)
    before = _first(block(*sample[0], **sample[1]))
    undo = _scale_in_place(model.get_submodule(candidate), [layers[n] for n in group], trial)
    after = _first(block(*sample[0], **sample[1]))
    undo()
    change = float((after - before).norm() / before.norm().clamp(min=1e-30))
    return candidate if math.isfinite(change) and change < FOLD_TOLERANCE else ""


def _producer_norm(model: nn.Module, block: nn.Module, name: str, layers: dict[str, nn.Module],
                   sample: tuple[tuple, dict]) -> str:
    """The module of ``block`` whose output is the tensor ``name`` reads, when it is a norm with a 1-D
    weight of the layer's input width (RMSNorm, LayerNorm)."""
    outputs: dict[str, torch.Tensor] = {}
    seen: list[torch.Tensor] = []
    names = {module: n for n, module in model.named_modules()}
    in_features = _in_features(layers[name])
    def keep_output(module, args, output) -> None:
        outputs.setdefault(names[module], output)

    hooks = [m.register_forward_hook(keep_output) for m in block.modules() if _is_norm(m, in_features)]
    hooks.append(layers[name].register_forward_pre_hook(lambda m, args: seen.append(args[0])))
    try:
        block(*sample[0], **sample[1])
    finally:
        for handle in hooks:
            handle.remove()
    return next((n for n, out in outputs.items() if seen and out is seen[0]), "")


def _is_norm(module: nn.Module, width: int) -> bool:
    weight = getattr(module, "weight", None)
    return "norm" in type(module).__name__.lower() and isinstance(weight, torch.Tensor) and \
        weight.dim() == 1 and weight.shape[0] == width


def _scale_in_place(norm: nn.Module, layers: list[nn.Module], scales: torch.Tensor) -> Callable[[], None]:
    """Divide the norm's weight (and bias) by s, multiply the layers' weights by s; returns the undo."""
    saved = [(norm, "weight", norm.weight.data)]
    if getattr(norm, "bias", None) is not None:
        saved.append((norm, "bias", norm.bias.data))
    saved += [(layer, "weight", layer.weight.data) for layer in layers]
    norm.weight.data = norm.weight.data / scales.to(norm.weight.dtype)
    if getattr(norm, "bias", None) is not None:
        norm.bias.data = norm.bias.data / scales.to(norm.bias.dtype)
    for layer in layers:
        s = scales.to(layer.weight.dtype)
        layer.weight.data = layer.weight.data * (s[:, None] if is_conv1d(layer) else s)

    def undo() -> None:
        for module, attr, data in saved:
            getattr(module, attr).data = data
    return undo


def _fold(norm: nn.Module, scales: torch.Tensor, report: CalibrationReport, name: str) -> None:
    """Divide the norm's weight (and bias) by s for good; the new tensors are recorded for convert."""
    for attr in ("weight", "bias"):
        param = getattr(norm, attr, None)
        if param is not None:
            param.data = param.data / scales.to(param.dtype)
            report.folded[f"{name}.{attr}"] = param.data


def _weight(module: nn.Module) -> torch.Tensor:
    """The (out, in) float32 weight of a Linear or Conv1D."""
    weight = module.weight.detach()
    return (weight.t() if is_conv1d(module) else weight).float()


def _in_features(module: nn.Module) -> int:
    return module.weight.shape[0] if is_conv1d(module) else module.weight.shape[1]


def _rtn_sqnr(weight: torch.Tensor, hessian: torch.Tensor, fmt: NumberFormat) -> float:
    plain = dataclasses.replace(fmt, calibration=None)
    return output_sqnr_db(weight, round_trip(weight, plain), hessian)


def _replace(model: nn.Module, name: str, module: nn.Module, qt: QuantizedTensor) -> None:
    bias = getattr(module, "bias", None)
    set_submodule(model, name, QuantizedLinear.from_qtensor(qt, bias, module.weight.dtype))


def batch_tokens(batches: Sequence[Batch]) -> int:
    """Tokens in calibration batches: rows x positions of each batch's first tensor."""
    def tokens(batch: Batch) -> int:
        ids = batch if isinstance(batch, torch.Tensor) else next(iter(batch.values()))
        return int(ids.shape[0] * ids.shape[1]) if ids.dim() >= 2 else int(ids.numel())
    return sum(tokens(b) for b in batches)
