"""Other libraries' quantization of the same model, for the same table (optional extras).

A peer is data: a spec name (``quanto:qint8``), the package it needs and a function that quantizes a
copy of the model in place, leaving a given set of layers alone. ``run_peer`` turns any failure (not
installed, unsupported on this device or version) into a :class:`PeerError` carrying the reason, so
callers show a row instead of crashing. A peer is held to dtypelab's own scope: the output head stays
dense unless asked for (as vLLM serves it, and as dtypelab's formats leave it), kept modules stay as
they are, and every Linear layer's outcome is listed, so rows compare like with like.

Variants stage: a peer's package is imported only when its variant is built (lazily, by name), so a
command that asks for no peer never imports optimum-quanto or torchao.
"""

from __future__ import annotations

import copy
import importlib
import importlib.util
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import DtypelabError, UnknownFormatError, did_you_mean
from ..naming import inside_any
from ..quant import HEAD_REASON, KEPT_REASON, LayerOutcome, head_names
from ..tree import is_tensor_subclass


class PeerError(DtypelabError):
    """A peer library could not quantize the model; the message says why."""


def _quanto(weights: str) -> Callable[[nn.Module, set[str]], None]:
    def apply(model: nn.Module, skip: set[str]) -> None:
        quanto = importlib.import_module("optimum.quanto")
        quanto.quantize(model, weights=getattr(quanto, weights), exclude=sorted(skip) or None)
        quanto.freeze(model)
    return apply


def _torchao(config: str, **kwargs) -> Callable[[nn.Module, set[str]], None]:
    def apply(model: nn.Module, skip: set[str]) -> None:
        quantization = importlib.import_module("torchao.quantization")
        options = {k: v(quantization) if callable(v) else v for k, v in kwargs.items()}
        def wanted(module: nn.Module, fqn: str) -> bool:
            return isinstance(module, nn.Linear) and fqn not in skip
        quantization.quantize_(model, getattr(quantization, config)(**options), filter_fn=wanted)
    return apply


def _per_group_32(quantization):
    return importlib.import_module("torchao.quantization.granularity").PerGroup(32)


@dataclass(frozen=True)
class Peer:
    """One peer quantization: ``name`` as written after ``--to``, the package, what it does, and
    ``apply(model, skip)``, which quantizes ``model`` in place leaving the Linear layers named in ``skip``."""

    name: str
    package: str
    description: str
    apply: Callable[[nn.Module, set[str]], None]


PEERS: dict[str, Peer] = {p.name: p for p in (
    Peer("quanto:qint8", "optimum-quanto", "int8 weights, per-channel absmax", _quanto("qint8")),
    Peer("quanto:qint4", "optimum-quanto", "int4 weights, group 128, scale + shift", _quanto("qint4")),
    Peer("quanto:qfloat8", "optimum-quanto", "float8 e4m3 weights, per-channel", _quanto("qfloat8")),
    Peer("torchao:int8wo", "torchao", "int8 weight-only, per-channel", _torchao("Int8WeightOnlyConfig")),
    Peer("torchao:int4wo", "torchao", "int4 weight-only, group 32 (packed kernel layout)",
         _torchao("Int4WeightOnlyConfig", group_size=32)),
    Peer("torchao:intx4", "torchao", "int4 weight-only, group 32, stored unpacked in int8",
         _torchao("IntxWeightOnlyConfig", weight_dtype=torch.int4, granularity=_per_group_32)),
    Peer("torchao:fp8wo", "torchao", "float8 e4m3 weight-only, per-channel",
         _torchao("Float8WeightOnlyConfig")),
)}


def is_peer_spec(spec: str) -> bool:
    """True for ``quanto:...`` / ``torchao:...`` items of a ``--to`` list."""
    return spec.strip().lower().split(":")[0] in ("quanto", "torchao")


def check_peer_spec(spec: str) -> None:
    """Refuse an unknown peer before anything runs (a typo is a word, not a per-model result).

    Raises:
        UnknownFormatError: ``spec`` names no peer; the message suggests the closest.
    """
    name = spec.strip().lower()
    if name not in PEERS:
        raise UnknownFormatError(f"unknown peer {spec!r}{did_you_mean(name, PEERS)}: use one of "
                                 f"{', '.join(PEERS)}")


def _import_reason(peer: Peer, exc: ImportError) -> str:
    """Missing package (install the extra) or a missing piece inside an installed one (a version issue)."""
    module = peer.name.split(":")[0].replace("quanto", "optimum.quanto")
    if importlib.util.find_spec(module.split(".")[0]) is None or (
            "." in module and importlib.util.find_spec(module) is None):
        return f"{peer.name} needs {peer.package}, which is not installed: pip install 'dtypelab[peers]'"
    return f"{peer.name} is unavailable with this {peer.package} / torch version / device: {exc}"


@dataclass
class PeerRun:
    """A peer's quantized copy of the model, ``seconds`` (the wall time quantizing took) and every
    Linear layer's outcome: quantized, or left dense with the reason."""

    model: nn.Module
    seconds: float
    layers: list[LayerOutcome] = field(default_factory=list)


def run_peer(model: nn.Module, spec: str, keep: Sequence[str] = (), head: bool = False) -> PeerRun:
    """Quantize a copy of ``model`` with a peer library; ``model`` is not modified.

    Args:
        keep: names of modules left as they are, with everything inside them (a keep policy's roots).
        head: also quantize the output head (dense by default, as dtypelab's own formats leave it).

    Raises:
        PeerError: unknown peer spec, package not installed, or the peer failed (the reason is kept).
    """
    peer = PEERS.get(spec.strip().lower())
    if peer is None:
        raise PeerError(f"unknown peer {spec!r}: use one of {', '.join(PEERS)}")
    reasons = _dense_reasons(model, keep, head)
    new = copy.deepcopy(model)
    start = time.perf_counter()
    _apply(peer, new, set(reasons))
    seconds = time.perf_counter() - start
    if not any(is_tensor_subclass(p) for p in new.parameters()):
        raise PeerError(f"{peer.name} quantized nothing: no weight of this model was converted "
                        "(layer shapes it does not support?)")
    return PeerRun(new, seconds, _outcomes(new, reasons, peer.name))


def _dense_reasons(model: nn.Module, keep: Sequence[str], head: bool) -> dict[str, str]:
    """Linear layers the peer must leave alone, each with the reason dtypelab's formats give."""
    heads = set() if head else head_names(model)
    reasons = {}
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        if inside_any(name, keep):
            reasons[name] = KEPT_REASON
        elif name in heads:
            reasons[name] = HEAD_REASON
    return reasons


def _outcomes(model: nn.Module, reasons: dict[str, str], peer: str) -> list[LayerOutcome]:
    """Each Linear-shaped layer of the peer's model: quantized when its weight is the peer's tensor
    subclass or the peer swapped the module (quanto's QLinear), else dense with its reason."""
    outcomes = []
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if not isinstance(module, nn.Linear) or not isinstance(weight, torch.Tensor):
            continue
        quantized = is_tensor_subclass(weight) or type(module) is not nn.Linear
        reason = "" if quantized else reasons.get(name, f"{peer} left it dense (shape or type it skips)")
        outcomes.append(LayerOutcome(name, "Linear", quantized, reason))
    return outcomes


def _apply(peer: Peer, model: nn.Module, skip: set[str]) -> None:
    """Run the peer in place; any failure becomes a :class:`PeerError` with its first line."""
    try:
        peer.apply(model, skip)
    except ImportError as exc:
        raise PeerError(_import_reason(peer, exc)) from exc
    except Exception as exc:  # a third-party failure of any kind becomes the row's reason
        message = (str(exc).splitlines() or [""])[0][:200]
        raise PeerError(f"{peer.name} failed: {type(exc).__name__}: {message}") from exc
