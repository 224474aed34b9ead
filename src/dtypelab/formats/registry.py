"""Number formats as data: one frozen dataclass per format, one registry.

Formats stage: imports :mod:`dtypelab.formats.codecs`, :mod:`dtypelab.enums` and the errors only; the
spec grammar that picks an entry and sets its options is :mod:`dtypelab.formats.spec`.
Adding a format is adding an entry to ``_REGISTRY``; nothing else branches on format names.
Floating formats backed by a torch dtype with no element codec (fp32, fp16, bf16) take their figures
(max finite, eps, ...) from their IEEE layout (:data:`IEEE_LAYOUTS`, exponent and mantissa bits), which
tests/formats check against ``torch.finfo``; every smaller format carries an element codec
(:mod:`dtypelab.codecs`) and a scale scheme. Formats name their torch dtype (``"bfloat16"``) and resolve
it when asked: the registry, ``dtypelab formats`` and every command's help never import torch.

A spec string picks a registry entry and sets its options (see ``spec.GRAMMAR``)::

    int4:g128        int4, symmetric, one fp16 scale per 128 inputs (4.125 bits per weight)
    int4:g64:asym    ... with a uint8 zero point per group
    int8:channel     one scale per output row
    fp8_e4m3:tensor  one scale for the whole tensor
    int4:g128:mse    scales from a clipping search minimising the mean squared error
    int4:g64:gptq    codes from GPTQ on calibration inputs (error pushed onto columns not yet quantized)
    int4:g64:awq     AWQ: activation-aware input scales (folded into the norm before) and clipping
    int8:sfp16       int8 with fp16 instead of fp32 scales
    int8:a8          W8A8: weights int8, activations int8 per token (dynamic, emulated)
    fp8_e4m3:cast    no scale at all: a plain saturating cast of every element (fp8 checkpoints)
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..enums import StrEnum
from .codecs import FloatCodec, IntCodec, TableCodec

if TYPE_CHECKING:
    import torch


class Granularity(StrEnum):
    """How many elements share one scale: none (a plain cast), the whole tensor, a row, a group."""

    NONE = "none"
    TENSOR = "tensor"
    CHANNEL = "channel"
    GROUP = "group"


Codec = FloatCodec | IntCodec | TableCodec


E4M3 = FloatCodec(4, 3, 7, overflow="saturate")


E5M2 = FloatCodec(5, 2, 15, nan="ieee", overflow="inf")


E2M1 = FloatCodec(2, 1, 1, nan="none", overflow="saturate")


E8M0 = FloatCodec(8, 0, 127, signed=False, subnormals=False, overflow="nan", ties="up")


# Symmetric integers use every code (-8..7 for int4) with a signed scale; see qtensor's module doc.
INT8 = IntCodec(8, restricted=False)


INT4 = IntCodec(4, restricted=False)


INT3 = IntCodec(3, restricted=False)


INT2 = IntCodec(2, restricted=False)


UINT8 = IntCodec(8, signed=False)


UINT4 = IntCodec(4, signed=False)


# NF4 (QLoRA, Dettmers et al. 2023): quantiles of N(0, 1) normalised to [-1, 1], exact zero included.
NF4 = TableCodec((-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
                  -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
                  0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
                  0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0), "nf4")


@functools.cache
def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype called ``name`` (``"bfloat16"`` -> ``torch.bfloat16``), importing torch."""
    import torch

    return getattr(torch, name)


class _TorchDtypes(Mapping):
    """A name -> torch dtype table whose dtypes are resolved (and torch imported) on lookup."""

    def __init__(self, names: dict[str, str]) -> None:
        self._names = names

    def __getitem__(self, key: str) -> torch.dtype:
        return torch_dtype(self._names[key])

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


# Scale formats: the torch dtype a scale tensor is stored in, and its bits.
SCALE_DTYPE_NAMES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16", "e8m0": "float8_e8m0fnu",
                     "e4m3": "float8_e4m3fn"}
SCALE_BITS = {"fp32": 32, "fp16": 16, "bf16": 16, "e8m0": 8, "e4m3": 8}
SCALE_DTYPES: Mapping[str, torch.dtype] = _TorchDtypes(SCALE_DTYPE_NAMES)


@dataclass(frozen=True)
class IeeeLayout:
    """An IEEE 754 binary float's layout: its figures follow from the exponent and mantissa widths."""

    exp_bits: int
    man_bits: int

    @property
    def max_finite(self) -> float:
        return math.ldexp(2.0 - math.ldexp(1.0, -self.man_bits), (1 << (self.exp_bits - 1)) - 1)

    @property
    def smallest_normal(self) -> float:
        return math.ldexp(1.0, 2 - (1 << (self.exp_bits - 1)))

    @property
    def smallest_subnormal(self) -> float:
        return math.ldexp(self.smallest_normal, -self.man_bits)

    @property
    def eps(self) -> float:
        return math.ldexp(1.0, -self.man_bits)


IEEE_LAYOUTS = {"float32": IeeeLayout(8, 23), "float16": IeeeLayout(5, 10), "bfloat16": IeeeLayout(8, 7)}
"""The plain floating formats' layouts, by torch dtype name (checked against ``torch.finfo``)."""


@dataclass(frozen=True)
class NumberFormat:
    """A number format an element of a tensor can be stored in, with its scaling when it has one.

    Args:
        name: canonical short name or spec (``"bf16"``, ``"int4:g128"``).
        bits: storage bits per element, scales excluded.
        dtype: the name of the torch dtype elements are stored in (``"bfloat16"``), when torch has one
            (None: packed bytes); a ``torch.dtype`` given here is stored by its name.
        description: one line for tables and help.
        aliases: other accepted spellings (``"bfloat16"``, ``"torch.bfloat16"``).
        codec: element codec for formats quantized with a scale; None for plain torch casts.
        granularity: :class:`Granularity`: none (plain cast), tensor, channel (per output row), group.
        group_size: elements per scale along the input dimension when granularity is ``"group"``.
        scale_format: key of ``SCALE_DTYPES`` the scales are stored in (``:sfp16`` etc. changes it).
        symmetric: False adds a zero point per block (integer codecs only).
        scale_search: ``"absmax"`` or ``"mse"`` (clipping search, same storage).
        tensor_scale: a second-level fp32 scale per tensor (NVFP4).
        activations: None, ``"int8"`` (dynamic per token) or ``"fp8"`` (dynamic per tensor, e4m3).
        fixed_layout: block-scaled standards (MX, NVFP4) whose granularity cannot be changed.
        calibration: None (data-free), ``"gptq"`` or ``"awq"``: codes and scales chosen from calibration
            inputs (:mod:`dtypelab.quant.calibrate`); same storage, so every layout and size is unchanged.
    """

    name: str
    bits: int
    dtype: str | None
    description: str
    aliases: tuple[str, ...] = field(default=())
    codec: Codec | None = None
    granularity: Granularity = Granularity.NONE
    group_size: int | None = None
    scale_format: str | None = None
    symmetric: bool = True
    scale_search: str = "absmax"
    tensor_scale: bool = False
    activations: str | None = None
    fixed_layout: bool = False
    base: str = ""
    calibration: str | None = None

    def __post_init__(self) -> None:
        if self.dtype is not None and not isinstance(self.dtype, str):  # a torch.dtype: keep its name
            object.__setattr__(self, "dtype", str(self.dtype).removeprefix("torch."))

    @property
    def torch_dtype(self) -> torch.dtype | None:
        """The torch dtype elements are stored in (None: packed bytes); imports torch."""
        return None if self.dtype is None else torch_dtype(self.dtype)

    @property
    def is_floating_point(self) -> bool:
        """A torch floating dtype holds the elements (fp32 ... fp8, mxfp8)."""
        return self.dtype is not None and self.dtype.startswith(("float", "bfloat"))

    @property
    def raw_castable(self) -> bool:
        """Elements are a plain torch cast with no scale: fp32 / fp16 / bf16, and fp8 with ``:cast``."""
        return self.is_floating_point and self.granularity == Granularity.NONE

    @property
    def is_quantized(self) -> bool:
        """True when elements need a scale: storing the model takes :func:`dtypelab.quantize`."""
        return self.codec is not None and self.granularity != Granularity.NONE

    @property
    def element_codec(self) -> Codec | None:
        """The codec elements are stored with: asymmetric integers use the unsigned variant."""
        if self.symmetric or self.codec is None:
            return self.codec
        return IntCodec(self.codec.bits, signed=False)

    @property
    def element(self) -> str:
        """Element encoding, e.g. ``e4m3``, ``int4``, ``nf4``; the torch dtype name for plain casts."""
        return self.element_codec.kind if self.codec else self.dtype

    @property
    def max_finite(self) -> float:
        """Largest finite element value (in units of the scale for quantized formats)."""
        return self.element_codec.max_finite if self.codec else IEEE_LAYOUTS[self.dtype].max_finite

    @property
    def smallest_normal(self) -> float:
        """Smallest positive normal value (in units of the scale for quantized formats)."""
        return self.element_codec.smallest_normal if self.codec else IEEE_LAYOUTS[self.dtype].smallest_normal

    @property
    def smallest_subnormal(self) -> float:
        """Smallest positive value; anything below half of it flushes to zero."""
        if self.codec:
            return self.element_codec.smallest_subnormal
        return IEEE_LAYOUTS[self.dtype].smallest_subnormal

    @property
    def eps(self) -> float:
        """Gap between 1.0 and the next value: twice the worst relative rounding error."""
        return self.codec.eps if self.codec else IEEE_LAYOUTS[self.dtype].eps

    @property
    def has_inf(self) -> bool:
        """Whether the element encoding has ±inf (plain torch floats do)."""
        return self.codec.has_inf if self.codec else True

    @property
    def has_nan(self) -> bool:
        """Whether the element encoding has a NaN (plain torch floats do)."""
        return self.codec.has_nan if self.codec else True

    @property
    def scale_bits(self) -> int:
        """Bits of one scale (0 when there is none)."""
        return SCALE_BITS[self.scale_format] if self.scale_format else 0

    @property
    def zero_point_bits(self) -> int:
        """Bits of one zero point: uint8 per block for asymmetric formats."""
        return 0 if self.symmetric else 8

    def group_problem(self, row_length: int) -> str | None:
        """Why a row of ``row_length`` inputs cannot be stored in blocks of this format (None when it
        can): the one message ``quantize_model`` and ``convert`` give, with the advice that applies."""
        if self.granularity != Granularity.GROUP or row_length % self.group_size == 0:
            return None
        if self.fixed_layout:
            return (f"{self.name} stores blocks of exactly {self.group_size}, which do not divide the row "
                    f"length {row_length}: the layer stays dense (no option changes {self.name}'s block)")
        return (f"group size {self.group_size} does not divide the row length {row_length}: choose a group "
                "size that divides it or use :channel")

    def effective_bits(self, row_length: int | None = None) -> float:
        """Storage bits per element including scales and zero points.

        Args:
            row_length: input features of a row; needed for per-channel / per-tensor formats, whose
                overhead depends on the shape (None: that overhead is left out).
        Example:
            >>> get_format("int4:g128").effective_bits()
            4.125
        """
        per_block = self.scale_bits + self.zero_point_bits
        if self.granularity == Granularity.GROUP:
            return self.bits + per_block / self.group_size
        if self.granularity == Granularity.CHANNEL and row_length:
            return self.bits + per_block / row_length
        return float(self.bits)


def _q(name: str, bits: int, dtype: str | None, desc: str, aliases: tuple[str, ...],
       codec: Codec, **options) -> NumberFormat:
    return NumberFormat(name, bits, dtype, desc, aliases, codec, base=name, **options)


_REGISTRY: tuple[NumberFormat, ...] = (
    NumberFormat("fp32", 32, "float32", "IEEE 754 single precision",
                 ("float32", "float", "torch.float32"), base="fp32"),
    NumberFormat("fp16", 16, "float16", "IEEE 754 half precision: 5-bit exponent, max 65504",
                 ("float16", "half", "torch.float16"), base="fp16"),
    NumberFormat("bf16", 16, "bfloat16", "bfloat16: float32's range, 8-bit mantissa",
                 ("bfloat16", "torch.bfloat16"), base="bf16"),
    _q("fp8_e4m3", 8, "float8_e4m3fn", "OCP fp8 e4m3fn (no inf, saturates at 448), scaled",
       ("float8_e4m3fn", "fp8", "e4m3", "torch.float8_e4m3fn"), E4M3,
       granularity=Granularity.CHANNEL, scale_format="fp32"),
    _q("fp8_e5m2", 8, "float8_e5m2", "OCP fp8 e5m2 (IEEE-like, inf/NaN), scaled",
       ("float8_e5m2", "e5m2", "torch.float8_e5m2"), E5M2,
       granularity=Granularity.CHANNEL, scale_format="fp32"),
    _q("int8", 8, "int8", "8-bit integer, -128..127, signed scale (symmetric) unless :asym",
       ("qint8", "torch.int8"), INT8, granularity=Granularity.CHANNEL, scale_format="fp32"),
    _q("int4", 4, None, "4-bit integer packed two per byte, -8..7, signed scale unless :asym",
       ("qint4",), INT4, granularity=Granularity.GROUP, group_size=128, scale_format="fp16"),
    _q("int3", 3, None, "3-bit integer, -4..3, one code per byte in memory, packed densely (10 2/3 per "
       "int32 word) on disk; signed scale unless :asym", (), INT3, granularity=Granularity.GROUP,
       group_size=128, scale_format="fp16"),
    _q("int2", 2, None, "2-bit integer, -2..1, packed 16 per int32 word on disk; signed scale unless :asym",
       (), INT2, granularity=Granularity.GROUP, group_size=128, scale_format="fp16"),
    _q("nf4", 4, None, "NormalFloat4 (QLoRA): normal quantiles, absmax per block of 64",
       (), NF4, granularity=Granularity.GROUP, group_size=64, scale_format="fp16"),
    _q("mxfp8", 8, "float8_e4m3fn", "OCP MX: e4m3 elements, e8m0 scale per 32",
       ("mxfp8_e4m3",), E4M3, granularity=Granularity.GROUP, group_size=32, scale_format="e8m0",
       fixed_layout=True),
    _q("mxfp4", 4, None, "OCP MX: e2m1 elements, e8m0 scale per 32",
       ("mxfp4_e2m1",), E2M1, granularity=Granularity.GROUP, group_size=32, scale_format="e8m0",
       fixed_layout=True),
    _q("nvfp4", 4, None, "NVIDIA FP4: e2m1 elements, e4m3 scale per 16, fp32 global scale (a divisor, "
       "as compressed-tensors and vLLM store it) per tensor",
       (), E2M1, granularity=Granularity.GROUP, group_size=16, scale_format="e4m3", tensor_scale=True,
       fixed_layout=True),
)


_BY_NAME: dict[str, NumberFormat] = {
    alias.lower(): fmt for fmt in _REGISTRY for alias in (fmt.name, *fmt.aliases)
}


def all_formats() -> tuple[NumberFormat, ...]:
    """Every registered format with its default options, in registry order."""
    return _REGISTRY



def base_format(name: str) -> NumberFormat | None:
    """The registry entry of a name or alias (case-insensitive), with its default options; None if unknown."""
    return _BY_NAME.get(name.lower())
