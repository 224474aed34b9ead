"""Other libraries' quantization of the same model, for the same table (optional extras).

A peer is data: a spec name (``quanto:qint8``), the package it needs and a function that quantizes a
copy of the model in place. ``run_peer`` turns any failure (not installed, unsupported on this device
or version) into a :class:`PeerError` carrying the reason, so callers show a row instead of crashing.

Variants stage: a peer's package is imported only when its variant is built (lazily, by name), so a
command that asks for no peer never imports optimum-quanto or torchao.
"""

from __future__ import annotations

import copy
import importlib
import importlib.util
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import DtypelabError
from ..tree import is_tensor_subclass


class PeerError(DtypelabError):
    """A peer library could not quantize the model; the message says why."""


def _quanto(weights: str) -> Callable[[nn.Module], None]:
    def apply(model: nn.Module) -> None:
        quanto = importlib.import_module("optimum.quanto")
        quanto.quantize(model, weights=getattr(quanto, weights))
        quanto.freeze(model)
    return apply


def _torchao(config: str, **kwargs) -> Callable[[nn.Module], None]:
    def apply(model: nn.Module) -> None:
        quantization = importlib.import_module("torchao.quantization")
        options = {k: v(quantization) if callable(v) else v for k, v in kwargs.items()}
        quantization.quantize_(model, getattr(quantization, config)(**options))
    return apply


def _per_group_32(quantization):
    return importlib.import_module("torchao.quantization.granularity").PerGroup(32)


@dataclass(frozen=True)
class Peer:
    """One peer quantization: ``name`` as written after ``--to``, the package, what it does."""

    name: str
    package: str
    description: str
    apply: Callable[[nn.Module], None]


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


def _import_reason(peer: Peer, exc: ImportError) -> str:
    """Missing package (install the extra) or a missing piece inside an installed one (a version issue)."""
    module = peer.name.split(":")[0].replace("quanto", "optimum.quanto")
    if importlib.util.find_spec(module.split(".")[0]) is None or (
            "." in module and importlib.util.find_spec(module) is None):
        return f"{peer.name} needs {peer.package}, which is not installed: pip install 'dtypelab[peers]'"
    return f"{peer.name} is unavailable with this {peer.package} / torch version / device: {exc}"


@dataclass
class PeerRun:
    """A peer's quantized copy of the model and ``seconds``, the wall time quantizing took."""

    model: nn.Module
    seconds: float


def run_peer(model: nn.Module, spec: str) -> PeerRun:
    """Quantize a copy of ``model`` with a peer library; ``model`` is not modified.

    Raises:
        PeerError: unknown peer spec, package not installed, or the peer failed (the reason is kept).
    """
    peer = PEERS.get(spec.strip().lower())
    if peer is None:
        raise PeerError(f"unknown peer {spec!r}: use one of {', '.join(PEERS)}")
    new = copy.deepcopy(model)
    start = time.perf_counter()
    _apply(peer, new)
    seconds = time.perf_counter() - start
    if not any(is_tensor_subclass(p) for p in new.parameters()):
        raise PeerError(f"{peer.name} quantized nothing: no weight of this model was converted "
                        "(layer shapes it does not support?)")
    return PeerRun(new, seconds)


def _apply(peer: Peer, model: nn.Module) -> None:
    """Run the peer in place; any failure becomes a :class:`PeerError` with its first line."""
    try:
        peer.apply(model)
    except ImportError as exc:
        raise PeerError(_import_reason(peer, exc)) from exc
    except Exception as exc:  # a third-party failure of any kind becomes the row's reason
        message = (str(exc).splitlines() or [""])[0][:200]
        raise PeerError(f"{peer.name} failed: {type(exc).__name__}: {message}") from exc
