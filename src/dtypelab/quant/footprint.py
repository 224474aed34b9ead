"""What a model holds: every parameter and buffer, its dtype and bytes, and which share storage.

Tied weights (one tensor reachable under two names) are listed under every name but counted once,
as ``torch.nn.Module.parameters()`` and transformers' ``get_memory_footprint()`` count them.

Quant stage: what a model in a format holds — plain tensors, dtypelab's packed layers and the peers'
quantized tensor subclasses alike (through :mod:`dtypelab.tree`'s storage helpers).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from ..report import Table, TableMixin
from ..tree import is_tensor_subclass, storage_dtype, storage_key, storage_nbytes


@dataclass(frozen=True)
class TensorInfo:
    """One named parameter or buffer.

    ``nbytes`` is this tensor's own storage in bytes; ``shares_with`` names the first tensor listed
    earlier that holds the same storage (its bytes are then not counted again). ``float32_nbytes``:
    its bytes in the float32 model when they cannot be told from its dtype (the codes of a quantized
    weight stand for the whole float32 weight, its scales for nothing); None otherwise.
    """

    name: str
    kind: str  # "parameter" | "buffer" | "tensor" (from a state dict)
    dtype: str
    shape: tuple[int, ...]
    numel: int
    nbytes: int
    shares_with: str | None = None
    float32_nbytes: int | None = None


@dataclass(frozen=True)
class DtypeSummary:
    """Tensors of one (storage) dtype, shared storage counted once: count, elements and bytes."""

    dtype: str
    tensors: int
    numel: int
    nbytes: int


@dataclass
class ModelInspection(TableMixin):
    """The result of :func:`inspect_model`; renders as a table (text, HTML, JSON).

    ``footprint_bytes`` is what the model holds in memory (transformers' ``get_memory_footprint``);
    ``stored_bytes``, when known (``dtypelab inspect`` fills it), what a checkpoint of it holds — no
    computed buffers, quantized layers in their on-disk layout — the bytes ``compare`` reports.
    """

    tensors: list[TensorInfo]
    by_dtype: list[DtypeSummary] = field(default_factory=list)
    footprint_bytes: int = 0
    stored_bytes: int | None = None

    @property
    def shared_groups(self) -> dict[str, list[str]]:
        """Owner name -> the other names that share its storage (tied weights)."""
        groups: dict[str, list[str]] = {}
        for info in self.tensors:
            if info.shares_with is not None:
                groups.setdefault(info.shares_with, []).append(info.name)
        return groups

    @property
    def float32_bytes(self) -> int:
        """Bytes the same model takes in float32: floating tensors at 4 bytes an element, quantized
        weights at their float32 size, the rest (integer buffers) as they are."""
        return sum(_float32_nbytes(t) for t in self.tensors if t.shares_with is None)

    @property
    def ratio_to_float32(self) -> float:
        """``footprint_bytes / float32_bytes``: 0.5 for a model held entirely in fp16 or bf16."""
        return self.footprint_bytes / self.float32_bytes if self.float32_bytes else 1.0

    def to_table(self) -> Table:
        """One row per entry, summary lines as notes (rendered by :class:`~dtypelab.report.Table`)."""
        rows = [[t.name, t.kind, t.dtype, list(t.shape), t.numel, t.nbytes, t.shares_with or ""]
                for t in self.tensors]
        notes = [f"{s.dtype}: {s.tensors} tensors, {s.numel:,} elements, {s.nbytes:,} bytes"
                 for s in self.by_dtype]
        notes.append(f"footprint: {self.footprint_bytes:,} bytes (shared storage counted once) = "
                     f"{self.ratio_to_float32:.3f} x float32 ({self.float32_bytes:,} bytes)")
        if self.stored_bytes is not None:
            notes.append(f"in a checkpoint: {self.stored_bytes:,} bytes (what compare reports and convert "
                         "writes: no computed buffers, quantized layers in their stored layout)")
        shared = any(t.shares_with for t in self.tensors)  # the column only when something is shared
        columns = ["name", "kind", "dtype", "shape", "numel", "nbytes", "shares_with"]  # the JSON's names
        return Table("Tensors", columns, rows, notes,
                     default_columns=["name", "dtype", "shape", "nbytes"] + ["shares_with"] * shared)


def _float32_nbytes(info: TensorInfo) -> int:
    if info.float32_nbytes is not None:
        return info.float32_nbytes
    return info.numel * 4 if _is_floating(info.dtype) else info.nbytes


def _is_floating(dtype_name: str) -> bool:
    """A floating dtype name; ``int8+float32`` (a quantized subclass: codes and float scales) counts as
    floating too, since the tensor it stands for is (it reports float32)."""
    dtypes = [getattr(torch, name, None) for name in dtype_name.split("+")]
    return any(isinstance(dtype, torch.dtype) and dtype.is_floating_point for dtype in dtypes)


def named_tensors(model: nn.Module) -> Iterator[tuple[str, str, torch.Tensor]]:
    """Every (name, kind, tensor), tied names included, parameters first as torch orders them."""
    for name, param in model.named_parameters(remove_duplicate=False):
        yield name, "parameter", param
    for name, buf in model.named_buffers(remove_duplicate=False):
        yield name, "buffer", buf


def inspect_model(model: nn.Module) -> ModelInspection:
    """List every parameter and buffer of ``model`` with dtype, shape and bytes.

    Returns:
        A :class:`ModelInspection`: per-tensor rows, a per-dtype summary and ``footprint_bytes``,
        the bytes the model's tensors occupy with shared storage counted once.

    Example:
        >>> inspect_model(DummyModel()).footprint_bytes
        120
    """
    return inspect_tensors(named_tensors(model), _quantized_float32_nbytes(model))


def _quantized_float32_nbytes(model: nn.Module) -> dict[str, int]:
    """Tensor name -> float32 bytes, for weights a module holds as codes + scales (dtypelab's
    quantized layers: a ``qweight`` buffer and the float weight's ``weight_shape``)."""
    sizes: dict[str, int] = {}
    for prefix, module in model.named_modules():
        buffers, shape = dict(module.named_buffers(recurse=False)), getattr(module, "weight_shape", None)
        if shape is None or "qweight" not in buffers:
            continue
        for name in buffers:  # codes: the whole float32 weight; scales and zero points: nothing
            sizes[f"{prefix}.{name}" if prefix else name] = math.prod(shape) * 4 if name == "qweight" else 0
    return sizes


def inspect_tensors(items: Iterable[tuple[str, str, torch.Tensor]],
                    float32_nbytes: Mapping[str, int] | None = None) -> ModelInspection:
    """:func:`inspect_model` for any ``(name, kind, tensor)`` sequence, e.g. a loaded state dict.

    Args:
        float32_nbytes: bytes in the float32 model of tensors whose dtype does not tell them (by name).
    """
    owners: dict[tuple, str] = {}
    rows, float32_nbytes = [], float32_nbytes or {}
    for name, kind, tensor in items:
        owner = owners.setdefault(storage_key(tensor), name)
        rows.append(TensorInfo(name, kind, storage_dtype(tensor), tuple(tensor.shape), tensor.numel(),
                               storage_nbytes(tensor), None if owner == name else owner,
                               float32_nbytes.get(name)))
    return _summarise(rows)


def _summarise(rows: list[TensorInfo]) -> ModelInspection:
    totals: dict[str, list[int]] = {}
    for info in rows:
        if info.shares_with is None:
            count = totals.setdefault(info.dtype, [0, 0, 0])
            count[0], count[1], count[2] = count[0] + 1, count[1] + info.numel, count[2] + info.nbytes
    by_dtype = [DtypeSummary(dtype, *counts) for dtype, counts in totals.items()]
    return ModelInspection(rows, by_dtype, sum(s.nbytes for s in by_dtype))


def param_dtype_lines(model: nn.Module) -> list[str]:
    """The seed notebook's listing, one ``"<name> is loaded in <dtype>"`` line per parameter."""
    return [f"{name} is loaded in {param.dtype}{_stored_note(param)}"
            for name, param in model.named_parameters()]


def _stored_note(tensor: torch.Tensor) -> str:
    """For quantized subclasses, what the bytes really are (their ``dtype`` says float32)."""
    if not is_tensor_subclass(tensor):
        return ""
    return f" (stored as {storage_dtype(tensor)}, {storage_nbytes(tensor):,} bytes)"


def print_param_dtype(model: nn.Module) -> None:
    """Print the notebook's listing (the one convenience that prints, kept for the seed's users)."""
    print("\n".join(param_dtype_lines(model)))
