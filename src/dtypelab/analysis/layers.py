"""Where the error comes from: every module's output in the reference and a variant, side by side.

The reference and a variant run in lock-step: the reference's forward runs in a worker thread and
stops at each hooked module until the variant (in the calling thread) has reached the same module;
both outputs are then measured and dropped. Only one pair of layer outputs is ever held beyond what
a forward holds anyway, so the extra memory is about two of the largest activations, not every
activation of two models (see ``benchmarks/bench_layers.py``). The noise floor that follows is one
more forward of a rounded float32 copy of the weights (``noise_floor=False`` skips it).

Two modes:

* ``propagated``: each model runs on its own; a row shows the error accumulated up to that layer,
  and ``added_relative_error`` how much the layer itself changed it (output minus input error).
* ``isolated``: each variant layer is run again on the reference layer's input (rounded to the
  variant's dtype), so a row shows only that layer's own contribution.

A module may write into its own input (``nn.ReLU(inplace=True)``, ``x += …``), and a forward hook only
sees the inputs afterwards. Version counters show which calls did: isolated mode keeps a copy of the
reference inputs from each call's start and re-runs on that; propagated mode names those calls
(``input_changed_in_place``) and leaves their input error unknown.

Metrics are accumulated chunk by chunk in float64 (:class:`dtypelab.analysis.metrics.ErrorSums`) so that
measuring never makes float64 copies of a whole activation; they equal ``output_metrics``.

Analysis stage: runs with :mod:`~dtypelab.analysis.run`, judges with :mod:`~dtypelab.analysis.verdict`.
"""

from __future__ import annotations

import contextlib
import math
import queue
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from ..errors import DtypelabError, InputError
from ..formats import NumberFormat
from ..progress import ProgressCallback, stage
from ..report import Table, TableMixin
from ..tree import map_tensors
from ..variants import Variant, as_variants, is_peer_spec
from .defaults import DEFAULT_THRESHOLD_DB, MODES
from .metrics import ErrorSums, OutputMetrics, measure, valid_positions
from .run import is_logits_output, run_model, select_layers, select_output
from .verdict import (
    judged_by_floor,
    noise_floor_db,
    quality_band,
    rounding_floor_db,
    row_verdict,
    variant_verdict,
)


@dataclass(frozen=True)
class LayerRow:
    """One module call in execution order, measured against the same call in the reference.

    Args:
        name: qualified module name; ``#k`` is appended for the k-th repeated call of one module.
        module_type: the module's class name.
        shape: shape of the compared output tensor.
        reference_absmax: largest |value| of the reference output.
        metrics: the variant's output against the reference output.
        input_relative_error: relative error of the input the variant layer received (0 in isolated
            mode, where it is fed the reference input; None when the layer has no floating input, or
            when the module changed its input in place so that it is no longer known).
        added_relative_error: how much relative error this layer added: output minus input error
            (the whole output error when there is no floating input; NaN when the input changed in
            place in propagated mode).
        floor_db: SQNR of the reference output rounded to the variant's format (the noise floor);
            None for a scaled (quantized) format, whose variants keep activations in float.
        verdict: the row judged as the variant is (:func:`~dtypelab.analysis.verdict.row_verdict`):
            against its floor where it has one, else by the quality bands.
    """

    name: str
    module_type: str
    shape: tuple[int, ...]
    reference_absmax: float
    metrics: OutputMetrics
    input_relative_error: float | None
    added_relative_error: float
    floor_db: float | None = None
    verdict: str = ""

    def crosses(self, threshold_db: float) -> bool:
        """True when the output SQNR is below ``threshold_db`` (NaN SQNR counts as crossing)."""
        sqnr = self.metrics.sqnr_db
        return math.isnan(sqnr) or sqnr < threshold_db


@dataclass(frozen=True)
class VariantLayers:
    """Every hooked layer of one variant, the model output and the verdict on it.

    ``first_crossing`` names the first layer (execution order) whose SQNR is below the threshold;
    ``noise_floor_db`` is the output SQNR that rounding to the format alone gives
    (:func:`dtypelab.analysis.verdict.rounding_floor_db`); ``verdict`` is ``within format noise``,
    ``degraded`` or ``broken`` (:func:`dtypelab.analysis.verdict.variant_verdict`), judged on ``final``
    against it.
    ``not_compared`` lists module calls whose output holds no floating tensor (nothing to measure);
    ``input_changed_in_place`` module calls (propagated mode) that overwrote their own input
    (``nn.ReLU(inplace=True)``, ``x += …``), so their input error and added error are unknown.
    A variant that could not be built has no rows, ``final`` None, verdict ``failed`` and its ``failure``.
    """

    name: str
    rows: list[LayerRow]
    final: OutputMetrics | None
    first_crossing: str | None
    noise_floor_db: float | None
    verdict: str
    not_compared: list[str] = field(default_factory=list)
    input_changed_in_place: list[str] = field(default_factory=list)
    format_name: str | None = None  # the format the floor is taken in; None when there is none
    failure: str | None = None  # why the variant could not be built (then no rows and no final)
    logits: bool = field(default=False, repr=False)
    banded: bool = False  # judged by the quality bands (weight-only scaled formats, peers), not a floor


COMPACT_COLUMNS = ["variant", "layer", "sqnr_db", "floor_db", "verdict"]
"""What a terminal shows of a layer-wise comparison by default (plus ``status`` when a row is not ok):
each layer's SQNR against the rounding floor and its verdict, within 100 columns for names of ~45
characters; the rest with ``--columns all`` or ``--json``."""


@dataclass
class LayerComparison(TableMixin):
    """The result of :func:`compare_layers`: one :class:`VariantLayers` per variant."""

    mode: str
    threshold_db: float
    logits: bool
    variants: list[VariantLayers] = field(default_factory=list)

    def to_table(self) -> Table:
        columns = ["variant", "layer", "module_type", "shape", "reference_absmax", "mean_abs_diff",  # JSON's
                   "max_abs_diff", "relative_error", "added_relative_error", "sqnr_db", "floor_db",
                   "cosine_similarity", "verdict", "status"]
        rows = [[v.name, r.name, r.module_type, list(r.shape), r.reference_absmax, r.metrics.mean_abs_diff,
                 r.metrics.max_abs_diff, r.metrics.relative_error, r.added_relative_error, r.metrics.sqnr_db,
                 r.floor_db, r.metrics.cosine_similarity, r.verdict,
                 r.metrics.status + (" <- first crossing" if r.name == v.first_crossing else "")]
                for v in self.variants for r in v.rows]
        rows += [[v.name, None, None, None, None, None, None, None, None, None, None, None, "failed",
                  f"failed: {v.failure}"] for v in self.variants if v.failure]
        # the status column only when a layer's output is not finite (the first crossing has its note)
        unusual = any(r.metrics.status != "ok" for v in self.variants for r in v.rows)
        return Table(f"Layer-wise comparison ({self.mode}; threshold {self.threshold_db:g} dB SQNR)",
                     columns, rows, [self._note(v) for v in self.variants],
                     default_columns=COMPACT_COLUMNS + ["status"] * unusual)

    def _note(self, v: VariantLayers) -> str:
        if v.failure:
            return f"{v.name}: failed: {v.failure}"
        crossing = (f"first layer below {self.threshold_db:g} dB: {v.first_crossing}" if v.first_crossing
                    else f"no layer below {self.threshold_db:g} dB")
        floor = f"rounding alone {v.noise_floor_db:.1f} dB" if v.noise_floor_db is not None else (
            "judged by quality bands" if v.banded else "rounding alone unknown (noise_floor=False)"
            if v.format_name else f"rounding alone unknown ({v.name!r} names no format)")
        top1 = "" if v.final.top1_agreement is None else f", top-1 agreement {v.final.top1_agreement:.3f}"
        skipped = f"; not compared (no floating output): {', '.join(v.not_compared)}" * bool(v.not_compared)
        in_place = (f"; input changed in place, added error unknown: {', '.join(v.input_changed_in_place)}"
                    * bool(v.input_changed_in_place))
        return (f"{v.name}: {crossing}; output SQNR {v.final.sqnr_db:.1f} dB{top1}, {floor} -> "
                f"{v.verdict}{skipped}{in_place}")


def compare_layers(reference: nn.Module, variants: Mapping[str, nn.Module | Variant] | Sequence[Variant],
                   inputs: torch.Tensor | Mapping[str, torch.Tensor], *, mode: str = "propagated",
                   depth: int | None = None, patterns: Sequence[str] = (),
                   threshold_db: float = DEFAULT_THRESHOLD_DB,
                   formats: Mapping[str, NumberFormat] | None = None,
                   output_name: str | None = None, output_kind: str = "auto",
                   top1_threshold: float = 0.9, noise_floor: bool = True,
                   progress: ProgressCallback | None = None) -> LayerComparison:
    """Compare every selected module's output between ``reference`` and each variant, in lock-step.

    Args:
        reference: the model taken as truth (usually float32); not modified (hooks are removed).
        variants: :class:`~dtypelab.variants.Variant` values (a failed one is a row with its reason), or
            display name -> model of the same architecture (e.g. from :func:`dtypelab.cast_model`); an
            iterator (:func:`~dtypelab.variants.iter_variants`) is consumed one variant at a time, each
            dropped before the next is built.
        inputs: a tensor (first positional argument) or a mapping of keyword arguments.
        mode: ``"propagated"`` or ``"isolated"`` (see the module docstring).
        depth, patterns: which modules to hook (:func:`select_layers`).
        threshold_db: a layer whose SQNR falls below this is a crossing; the first one is named.
        formats: variant name -> the format it was rounded to, for the noise floor; by default the
            variant's own format (a model passed under a format's name is in that format; no floor
            when there is none).
        output_name, output_kind: as in :func:`dtypelab.compare_models`.
        top1_threshold: top-1 agreement (0..1) below which a logits variant is ``broken``.
        noise_floor: run the rounding-only model once per variant for the noise floor and verdict
            (:func:`dtypelab.analysis.verdict.rounding_floor_db`: a float32 copy of the weights and one
            more forward, after the lock-step run); False skips it (verdict then ``unknown`` unless broken).
        progress: a :data:`~dtypelab.progress.ProgressCallback`, told each variant done (stage
            ``layers``); returning False cancels.

    Returns:
        A :class:`LayerComparison`; rows are in execution order (a block after its children).
    """
    if mode not in MODES:
        raise InputError(f"unknown mode {mode!r}: use one of {', '.join(MODES)}")
    if math.isnan(threshold_db):
        raise InputError("threshold nan dB: give a number of dB SQNR, e.g. 20")
    names = select_layers(reference, depth, patterns)
    result = LayerComparison(mode, threshold_db, False)
    listed = as_variants(variants) if isinstance(variants, Mapping | list | tuple) else variants
    bar = stage(progress, "layers", "variants", len(listed) if isinstance(listed, list) else None)
    for variant in listed:  # a generator's variants are built, measured and dropped one at a time
        result.variants.append(_variant_layers(reference, variant, names, inputs, mode, threshold_db,
                                               (formats or {}).get(variant.name) or variant.format,
                                               output_name, output_kind, top1_threshold, noise_floor))
        if result.variants[-1].final is not None:
            result.logits = result.variants[-1].logits
        bar.advance(detail=variant.name)
        del variant  # not held while the next one is built: peak is the reference plus one variant
    return result


def _variant_layers(reference: nn.Module, variant: Variant, names: list[str], inputs, mode: str,
                    threshold_db: float, fmt: NumberFormat | None, output_name: str | None,
                    output_kind: str, top1_threshold: float, noise_floor: bool) -> VariantLayers:
    """One variant's rows, final metrics, floor and verdict (a failed variant: its reason)."""
    if not variant.ok:
        return VariantLayers(variant.name, [], None, None, None, "failed", format_name=fmt and fmt.name,
                             failure=variant.failure)
    model = variant.model
    reference_modules = {id(m) for m in reference.modules()}
    if any(id(m) in reference_modules for m in model.modules()):
        raise InputError(f"variant {variant.name!r} shares modules with the reference, so the two cannot run "
                         "side by side: pass a copy, e.g. cast_model(model, 'fp32')")
    lockstep = _LockStep(reference, model, names, mode, fmt, output_name, output_kind)
    final, logits, reference_output = lockstep.run(inputs)
    banded = fmt is None if is_peer_spec(variant.spec) else fmt is not None and not judged_by_floor(fmt)
    floor = None
    if fmt is not None and noise_floor and not banded:  # a band needs no floor: no extra forward
        floor = rounding_floor_db(reference, fmt, inputs, output_name=output_name,
                                  reference_output=reference_output)
    del reference_output
    rows = [replace(r, verdict=row_verdict(r.metrics, None if banded else r.floor_db, floor))
            for r in lockstep.rows]
    crossing = next((r.name for r in rows if r.crosses(threshold_db)), None)
    verdict = (quality_band(final) if final.top1_agreement is None or final.top1_agreement >= top1_threshold
               else "broken") if banded else variant_verdict(final, floor, top1_threshold, fmt=fmt)
    return VariantLayers(variant.name, rows, final, crossing, floor, verdict, lockstep.not_compared,
                         lockstep.changed_in_place, fmt.name if fmt is not None else None, logits=logits,
                         banded=banded)


# ---- lock-step execution -------------------------------------------------------------------------

_END = object()


class _Aborted(Exception):
    """Raised inside the reference thread to unwind its forward when the variant side failed."""


@dataclass
class _Captured:
    """One reference module call handed to the variant side."""

    name: str
    args: tuple
    kwargs: dict
    output: object
    input_changed: bool = False  # an input was overwritten in place and no copy of it was kept


def _primary_tensor(value: object) -> torch.Tensor | None:
    """The floating tensor a layer's output stands for (logits / hidden state / first tensor)."""
    try:
        tensor = select_output(value)
    except (DtypelabError, TypeError):
        return None
    return tensor if tensor.is_floating_point() else None


def _primary_input(args: tuple, kwargs: dict) -> torch.Tensor | None:
    """The first floating tensor among the positional inputs, else ``hidden_states``, else any."""
    candidates = [*args, kwargs.get("hidden_states"), *kwargs.values()]
    return next((a for a in candidates if isinstance(a, torch.Tensor) and a.is_floating_point()), None)


def _feed_like(reference: object, variant: object) -> object:
    """The reference's value in the variant's dtype, saturating at its largest finite value (so a
    float32 mask minimum stays finite in fp16); non-floating values are the variant's own."""
    if isinstance(reference, torch.Tensor) and isinstance(variant, torch.Tensor):
        if not (reference.is_floating_point() and variant.is_floating_point()):
            return variant
        limit = torch.finfo(variant.dtype).max
        return reference.clamp(-limit, limit).to(device=variant.device, dtype=variant.dtype)
    pairable = isinstance(reference, list | tuple) and isinstance(variant, list | tuple)
    if pairable and len(reference) == len(variant):
        fed = (_feed_like(r, v) for r, v in zip(reference, variant, strict=True))
        return type(reference)(*fed) if hasattr(reference, "_fields") else type(reference)(fed)  # namedtuple
    if isinstance(reference, dict) and isinstance(variant, dict):
        return {k: _feed_like(reference.get(k), v) for k, v in variant.items()}
    return variant


class _CallNames:
    """Names module calls ``name``, ``name#1``, ``name#2`` … so repeated calls stay distinct."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}

    def __call__(self, name: str) -> str:
        k = self.counts.get(name, 0)
        self.counts[name] = k + 1
        return name if k == 0 else f"{name}#{k}"


@dataclass
class _Input:
    """A floating input tensor of one module call as the call began."""

    tensor: torch.Tensor
    version: int  # the tensor's version counter then: every in-place write increments it
    copy: torch.Tensor | None  # its values then, when copies are kept


class _CallInputs:
    """The inputs of the module calls under way, so that inputs a module overwrites in place
    (``nn.ReLU(inplace=True)``, ``x += …``, or a child doing so) are noticed, or restored.

    A forward hook sees the input tensors after the call: a module that wrote into its input hands
    the hook its output in the input's place. :meth:`begin` (a pre-hook) records each floating
    input's version counter and, with ``keep_copies``, a copy of it; nested calls that receive the same
    unchanged tensor share one copy, so the extra memory is one copy per distinct input under way.
    :meth:`end` (the forward hook) puts the copies back in place of overwritten inputs. Inference
    tensors (made under ``torch.inference_mode``) have no version counter; they cannot be written in
    place outside it either, so they are left as they are.
    """

    def __init__(self, keep_copies: bool) -> None:
        self.keep_copies = keep_copies
        self.calls: list[list[_Input]] = []  # a stack: calls nest

    def begin(self, args: tuple, kwargs: dict) -> None:
        entries: list[_Input] = []
        map_tensors((args, kwargs), lambda t: self._record(t, entries))
        self.calls.append(entries)

    def _record(self, tensor: torch.Tensor, entries: list[_Input]) -> torch.Tensor:
        if tensor.is_floating_point() and not tensor.is_inference():
            entries.append(_Input(tensor, tensor._version, self._copy(tensor) if self.keep_copies else None))
        return tensor

    def _copy(self, tensor: torch.Tensor) -> torch.Tensor:
        """A copy of ``tensor``'s current values, shared with an enclosing call's when unchanged since."""
        same = (e for call in self.calls for e in call if e.tensor is tensor and e.version == tensor._version)
        copy = next((e.copy for e in same), None)
        return tensor.clone() if copy is None else copy

    def end(self, args: tuple, kwargs: dict) -> tuple[tuple, dict, bool]:
        """``(args, kwargs)`` as the call received them where copies were kept, and whether some input
        was overwritten in place with no copy to put back."""
        changed = {id(e.tensor): e for e in self.calls.pop() if e.tensor._version != e.version}
        if not changed or not self.keep_copies:
            return args, kwargs, bool(changed)
        restored = map_tensors((args, kwargs), lambda t: changed[id(t)].copy if id(t) in changed else t)
        return *restored, False


@contextlib.contextmanager
def _no_grad() -> Iterator[None]:
    """Autograd off, but not inference mode (also inside a caller's ``torch.inference_mode()``):
    tensors made in inference mode have no version counter, which :class:`_CallInputs` needs."""
    with torch.inference_mode(False), torch.no_grad():
        yield


class _LockStep:
    """Runs the reference in a worker thread, pausing it at each hooked module until the variant
    (driven by the caller's thread) has produced the same module's output; measures; drops both."""

    def __init__(self, reference: nn.Module, variant: nn.Module, names: list[str], mode: str,
                 fmt: NumberFormat | None, output_name: str | None, output_kind: str) -> None:
        self.reference, self.variant, self.names, self.mode, self.fmt = reference, variant, names, mode, fmt
        self.output_name, self.output_kind = output_name, output_kind
        self.handoff: queue.Queue = queue.Queue(maxsize=1)
        self.resume = threading.Semaphore(0)
        self.abort = threading.Event()
        self.rerunning = False
        self.mask: torch.Tensor | None = None
        self.rows: list[LayerRow] = []
        self.not_compared: list[str] = []
        self.changed_in_place: list[str] = []
        # isolated mode feeds the reference inputs to the variant layer: keep them as they came in
        self.reference_inputs = _CallInputs(keep_copies=mode == "isolated")
        self.variant_inputs = _CallInputs(keep_copies=False)

    def run(self, inputs) -> tuple[OutputMetrics, bool, torch.Tensor]:
        """Run both models; fills ``rows`` and returns (final metrics, logits?, reference output)."""
        mask = inputs.get("attention_mask") if isinstance(inputs, Mapping) else None
        self.mask = mask if mask is not None and not bool(mask.all()) else None
        worker = threading.Thread(target=self._reference_side, args=(inputs,), daemon=True)
        with self._hooks():
            worker.start()
            try:
                with _no_grad():
                    variant_out = run_model(self.variant, inputs)
                final = self._final(variant_out)
            except BaseException:
                self._stop(worker)
                raise
        worker.join()
        return final

    # -- reference thread --
    def _reference_side(self, inputs) -> None:
        try:
            with _no_grad():
                output = run_model(self.reference, inputs)
            self._send(_Captured("", (), {}, output))
            self._send(_END)
        except _Aborted:
            return
        except BaseException as exc:  # handed to the caller's thread, which raises it
            self._send(exc)

    def _send(self, item: object) -> None:
        while not self.abort.is_set():
            with contextlib.suppress(queue.Full):
                self.handoff.put(item, timeout=0.1)
                return

    def _reference_pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self.reference_inputs.begin(args, kwargs)

    def _reference_hook(self, name: str, names: _CallNames):
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: object) -> None:
            if self.abort.is_set():
                raise _Aborted
            args, kwargs, changed = self.reference_inputs.end(args, kwargs)
            self._send(_Captured(names(name), args, kwargs, output, changed))
            self.resume.acquire()
            if self.abort.is_set():
                raise _Aborted
        return hook

    # -- variant (caller's) thread --
    def _receive(self) -> object:
        item = self.handoff.get()
        if isinstance(item, BaseException):
            raise item
        return item

    def _variant_pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if not self.rerunning:
            self.variant_inputs.begin(args, kwargs)

    def _variant_hook(self, name: str, names: _CallNames):
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: object) -> None:
            if self.rerunning:
                return
            call = names(name)
            changed = self.variant_inputs.end(args, kwargs)[2]
            item = self._receive()
            if item is _END or item.name != call:
                raise InputError(f"module calls differ: variant ran {call!r} where the reference ran "
                                 f"{getattr(item, 'name', 'nothing')!r}: compare models of one architecture")
            try:
                self._measure_layer(call, module, args, kwargs, output, item, changed)
            finally:
                del item
                self.resume.release()
        return hook

    def _measure_layer(self, call: str, module: nn.Module, args: tuple, kwargs: dict, output: object,
                       item: _Captured, input_changed: bool) -> None:
        ref_out = _primary_tensor(item.output)
        if ref_out is None:  # no floating output (ids, masks, caches): nothing to compare, but say so
            self.not_compared.append(call)
            return
        if self.mode == "isolated":
            output = self._rerun(module, item, args, kwargs)
        in_place = self.mode == "propagated" and (input_changed or item.input_changed)
        if in_place:  # the input this call received is gone: its error is unknown
            self.changed_in_place.append(call)
        cand = _primary_tensor(output)
        if cand is None:
            raise InputError(f"layer {call!r} returns a floating tensor in the reference but not in the "
                             "variant: compare models of one architecture")
        shape, ref_out, cand = tuple(ref_out.shape), self._valid(ref_out), self._valid(cand)
        floor = noise_floor_db(ref_out, self.fmt) if self.fmt is not None else None
        sums = _sums(ref_out, cand)
        metrics = sums.metrics()
        input_error = (0.0 if self.mode == "isolated" else None if in_place
                       else self._input_error(item, args, kwargs))
        added = math.nan if in_place else metrics.relative_error - (input_error or 0.0)
        self.rows.append(LayerRow(call, type(module).__name__, shape, sums.reference_absmax,
                                  metrics, input_error, added, floor))

    def _rerun(self, module: nn.Module, item: _Captured, args: tuple, kwargs: dict) -> object:
        """The variant module again, on the reference module's inputs in the variant's dtypes."""
        self.rerunning = True
        try:
            return module(*_feed_like(item.args, args), **_feed_like(item.kwargs, kwargs))
        finally:
            self.rerunning = False

    def _final(self, variant_out: object) -> tuple[OutputMetrics, bool, torch.Tensor]:
        item = self._receive()
        if item is _END or item.name != "":
            raise InputError(f"module calls differ: the reference ran {getattr(item, 'name', 'nothing')!r} "
                             "after the variant had finished: compare models of one architecture")
        reference_output = select_output(item.output, self.output_name)
        logits = is_logits_output(item.output, self.output_kind)
        cand = select_output(variant_out, self.output_name)
        metrics = measure(self._valid(reference_output), self._valid(cand), logits)
        if self._receive() is not _END:
            raise InputError("the reference produced more than one output: compare models of one "
                             "architecture")
        return metrics, logits, reference_output

    def _input_error(self, item: _Captured, args: tuple, kwargs: dict) -> float | None:
        ref_in, var_in = _primary_input(item.args, item.kwargs), _primary_input(args, kwargs)
        if ref_in is None or var_in is None or ref_in.shape != var_in.shape:
            return None
        return _sums(self._valid(ref_in), self._valid(var_in)).metrics().relative_error

    def _valid(self, tensor: torch.Tensor) -> torch.Tensor:
        """Padding positions left out, as :func:`dtypelab.compare.valid_positions` does for the output
        (a copy only when the batch holds padding)."""
        return tensor if self.mask is None else valid_positions(tensor, self.mask)

    def _stop(self, worker: threading.Thread) -> None:
        """Unblock and end the reference thread after the variant side failed."""
        self.abort.set()
        for _ in range(2):
            self.resume.release()
            with contextlib.suppress(queue.Empty):
                self.handoff.get_nowait()
        worker.join(timeout=30)

    @contextlib.contextmanager
    def _hooks(self) -> Iterator[None]:
        ref_names, var_names = _CallNames(), _CallNames()
        handles = []
        for name in self.names:
            reference, variant = self.reference.get_submodule(name), _get_submodule(self.variant, name)
            handles += [
                reference.register_forward_pre_hook(self._reference_pre_hook, with_kwargs=True),
                reference.register_forward_hook(self._reference_hook(name, ref_names), with_kwargs=True),
                variant.register_forward_pre_hook(self._variant_pre_hook, with_kwargs=True),
                variant.register_forward_hook(self._variant_hook(name, var_names), with_kwargs=True)]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()


def _get_submodule(model: nn.Module, name: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError as exc:
        raise InputError(f"the variant has no module {name!r}: compare models of one architecture") from exc


def _sums(reference: torch.Tensor, candidate: torch.Tensor) -> ErrorSums:
    sums = ErrorSums()
    sums.add(reference, candidate)
    return sums
