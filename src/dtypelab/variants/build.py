"""Variants: the candidates a reference is measured against, built one way for every command.

Variants stage, above :mod:`dtypelab.models` and :mod:`dtypelab.quant`. A ``--to`` list is parsed once
into :class:`VariantSpec` values (an unknown format or a malformed spec is an error before anything
runs); each is then built into a :class:`Variant`: a model in that format (a cast, ``quantize_model``, or
a peer library's quantization), or a failure with its reason (nothing to quantize, a peer that failed),
which every command shows as a row. A variant carries its format, so nothing downstream guesses it back
from a display name.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import InputError, UnknownFormatError
from ..formats import NumberFormat, get_format, split_list
from ..progress import ProgressCallback, stage
from ..quant import CalibrationReport, KeepPolicy, LayerOutcome, QuantizeResult, cast_model, quantize_model
from .calibration import CalibrationData
from .peers import PeerError, check_peer_spec, is_peer_spec, run_peer


@dataclass(frozen=True)
class VariantSpec:
    """One item of a ``--to`` list, validated: ``format`` is None for a peer (``quanto:qint8``)."""

    name: str
    spec: str
    format: NumberFormat | None

    @property
    def is_peer(self) -> bool:
        return self.format is None


@dataclass
class Variant:
    """A candidate model and what it is, or why it could not be built.

    Args:
        name: display name (the format's canonical spec, or the peer spec).
        spec: what the user wrote.
        format: the format it is in (None for a peer, or a module of unknown format).
        model: the candidate (None when it failed).
        failure: why it could not be built or run (None when ok).
        layers: for a quantized format, every candidate layer's outcome (quantized, or dense with its
            reason); empty for casts and peers.
    """

    name: str
    spec: str
    format: NumberFormat | None = None
    model: nn.Module | None = None
    failure: str | None = None
    layers: list[LayerOutcome] = field(default_factory=list)
    calibration: CalibrationReport | None = None  # what :gptq / :awq calibration did

    @property
    def ok(self) -> bool:
        return self.failure is None

    @classmethod
    def failed(cls, name: str, reason: str, fmt: NumberFormat | None = None) -> Variant:
        """A variant that could not be built: a row with its reason."""
        return cls(name, name, fmt, None, reason)

    @classmethod
    def of(cls, name: str, model: nn.Module | Variant) -> Variant:
        """A variant from what a library caller passed: a :class:`Variant` as it is, or a model under a
        display name (taken to be in the format of that name when it names one, e.g. ``"bf16"``)."""
        if isinstance(model, Variant):
            return model
        return cls(name, name, _format_named(name), model)


def parse_variant_specs(specs: str | Sequence[str]) -> list[VariantSpec]:
    """Parse a comma-separated ``--to`` list (or its items) into specs, validating every format.

    Raises:
        UnknownFormatError: an unknown format or peer, a malformed option, or an empty item.
    """
    items = split_list(specs) if isinstance(specs, str) else list(specs)
    parsed = []
    for item in items:
        if is_peer_spec(item):
            check_peer_spec(item)
        fmt = None if is_peer_spec(item) else get_format(item)
        parsed.append(VariantSpec(fmt.name if fmt else item, item, fmt))
    return parsed


def build_variant(reference: nn.Module, spec: VariantSpec, keep: KeepPolicy | None = None,
                  embeddings: bool = False, device: torch.device | str | None = None,
                  head: bool = False, calibration: CalibrationData | None = None,
                  progress: ProgressCallback | None = None) -> Variant:
    """Build one variant of ``reference`` (which is not modified); a format that finds nothing to
    quantize or a peer that fails becomes a failed :class:`Variant` with its reason.

    ``embeddings`` / ``head``: also quantize the embedding tables / the output head (both stay dense by
    default, as in ``quantize_model`` and ``convert``). ``calibration``: the batches ``:gptq`` / ``:awq``
    formats calibrate on (:func:`~dtypelab.variants.calibration.calibration_data`); without it such a
    format is a failed variant saying so. ``progress`` hears calibration's blocks (a ``"calibration"``
    stage), the one part of a build that takes minutes."""
    layers: list[LayerOutcome] = []
    report = None
    try:
        if spec.format is None:
            run = run_peer(reference, spec.spec, keep.kept_roots(reference) if keep else (), head)
            model, layers = run.model, run.layers
        elif spec.format.is_quantized:
            result = _quantize(reference, spec.format, keep, embeddings, head, calibration, progress)
            model, layers, report = result.model, result.layers, result.calibration
        else:
            model = cast_model(reference, spec.format, keep)
    except (InputError, PeerError) as err:
        return Variant(spec.name, spec.spec, spec.format, None, str(err))
    model = model.to(device) if device is not None else model
    return Variant(spec.name, spec.spec, spec.format, model, layers=layers, calibration=report)


def iter_variants(reference: nn.Module, specs: str | Sequence[str] | Sequence[VariantSpec],
                  keep: KeepPolicy | None = None, embeddings: bool = False,
                  device: torch.device | str | None = None,
                  progress: ProgressCallback | None = None, head: bool = False,
                  calibration: CalibrationData | None = None) -> Iterator[Variant]:
    """Build the variants one at a time, in order (every spec is validated before the first is built)."""
    parsed = specs if specs and isinstance(specs[0], VariantSpec) else parse_variant_specs(specs)
    bar = stage(progress, "variants", "variants", len(parsed))
    for spec in parsed:
        variant = build_variant(reference, spec, keep, embeddings, device, head, calibration, progress)
        bar.advance(detail=spec.name)
        yield variant
        del variant  # the caller measures it; this generator does not hold it while building the next


def build_variants(reference: nn.Module, specs: str | Sequence[str], keep: KeepPolicy | None = None,
                   embeddings: bool = False, device: torch.device | str | None = None,
                   progress: ProgressCallback | None = None, head: bool = False,
                   calibration: CalibrationData | None = None) -> dict[str, Variant]:
    """One :class:`Variant` per item of a ``--to`` list: our formats and peers (``quanto:qint8``,
    ``torchao:int8wo``), by display name; see :func:`iter_variants`."""
    return {v.name: v for v in iter_variants(reference, specs, keep, embeddings, device, progress, head,
                                             calibration)}


def as_variants(variants: Mapping[str, nn.Module | Variant] | Iterable[Variant]) -> list[Variant]:
    """What ``compare_models`` and ``compare_layers`` accept, as a list of :class:`Variant`."""
    if isinstance(variants, Mapping):
        return [Variant.of(name, model) for name, model in variants.items()]
    return list(variants)


def apply_format(model: nn.Module, fmt: str | NumberFormat, keep: KeepPolicy | None = None,
                 embeddings: bool = False, head: bool = False,
                 calibration: CalibrationData | None = None) -> nn.Module:
    """A copy of ``model`` in ``fmt``: cast for plain dtypes, :func:`quantize_model` for the rest
    (``calibration``: the batches a ``:gptq`` / ``:awq`` format calibrates on).

    Args:
        keep: modules to leave alone (cast: kept in float32; quantize: excluded with their children).
        embeddings, head: also quantize ``nn.Embedding`` tables / the output head (quantized formats
            only; both stay dense by default, as vLLM serves them).
    Raises:
        InputError: a quantized format finds nothing it can quantize (the reasons are in the message).
    """
    fmt = get_format(fmt)
    if not fmt.is_quantized:
        return cast_model(model, fmt, keep)
    return _quantize(model, fmt, keep, embeddings, head, calibration).model


def _quantize(model: nn.Module, fmt: NumberFormat, keep: KeepPolicy | None, embeddings: bool,
              head: bool, calibration: CalibrationData | None = None,
              progress: ProgressCallback | None = None) -> QuantizeResult:
    """``quantize_model`` with a keep policy: kept modules are excluded with their children."""
    roots = keep.kept_roots(model) if keep else []
    exclude = [p for root in roots for p in ((root, f"{root}.*") if root else ("*",))]
    batches = calibration.batches if calibration is not None else None
    result = quantize_model(model, fmt, exclude=exclude, embeddings=embeddings, head=head,
                            calibration=batches, progress=progress)
    if result.calibration is not None:
        result.calibration.source, result.calibration.ctx = calibration.source, calibration.ctx
    return result


def _format_named(name: str) -> NumberFormat | None:
    try:
        return get_format(name)
    except UnknownFormatError:
        return None
