"""The compressed-tensors checkpoint layout (read by vLLM and transformers, written by llm-compressor).

A quantized ``nn.Linear`` called ``NAME`` is stored as parts next to its dense neighbours::

    pack-quantized   (int4 / int8 weight-only)   NAME.weight_packed  int32 (rows, ceil(cols * bits / 32))
                                                  NAME.weight_scale   (rows, 1) | (rows, groups) | (1,)
                                                  NAME.weight_shape   int64 [rows, cols]
                                                  NAME.weight_zero_point (asym) int32, packed along rows
    int-quantized    (int weights, :a8 / :afp8)  NAME.weight int8 (rows, cols), NAME.weight_scale, zp int8
    naive-quantized  (fp8 weight-only)           NAME.weight float8_e4m3fn (rows, cols), NAME.weight_scale
    float-quantized  (fp8, :a8 / :afp8)          the same parts
    mxfp4-pack-quantized (mxfp4)                 NAME.weight_packed uint8 (rows, cols / 2), two e2m1 a byte
                                                  NAME.weight_scale   uint8 (rows, cols / 32): e8m0 exponents
    mxfp8-quantized  (mxfp8)                     NAME.weight float8_e4m3fn (rows, cols), NAME.weight_scale
                                                  uint8 (rows, cols / 32)
    nvfp4-pack-quantized (nvfp4)                 NAME.weight_packed uint8 (rows, cols / 2), two e2m1 a byte
                                                  NAME.weight_scale   float8_e4m3fn (rows, cols / 16)
                                                  NAME.weight_global_scale float32 (1,): g, a divisor

Packing: element ``i`` of a row sits at bits ``i * bits`` of the little-endian int32 words, as an
unsigned value ``q + 2^(bits-1)`` (compressed-tensors' ``pack_to_int32``). dtypelab's codes map onto it
without re-quantizing: symmetric codes are two's complement (flip the top bit of each code), asymmetric
codes are already unsigned and equal ``q + 2^(bits-1)`` with the zero point shifted the same way. The
value is always ``(q - zero_point) * scale``, so the layout decompresses to exactly the weights that
:func:`dtypelab.quantize_model` computes (tested against the package itself when it is installed).

The MX layouts are dtypelab's storage as it is: e2m1 codes packed two a byte with element ``2k`` in the
low nibble (the package's ``pack_fp4_to_uint8`` order, its index ``i`` being the e2m1 code ``i``), and each
e8m0 scale as its byte, the biased exponent ``e`` of ``2^(e - 127)`` (the package's ``compress_mx_scale``).
Both decompress exactly: the package multiplies a code by a power of two in bfloat16, which rounds the same
exact product dtypelab computes in float32 (tested: every code, scales 2^-127 to 2^127).

NVFP4 is stored as dtypelab holds it, too: dtypelab's nvfp4 *is* the package's rule (see
:mod:`dtypelab.quant.qtensor`), so its codes (packed as the MX ones), e4m3 block scales and fp32 global
scale ``g`` (a divisor, 448 * 6 / absmax) are the parts. The package decompresses ``code * fp32(scale /
g)`` in float32 (codes and e4m3 scales are exact in the bfloat16 it unpacks them to, and dividing by the
fp32 ``g`` promotes to float32) and rounds the product to bfloat16; dtypelab computes the same float32
product, so any dtype it is rounded to agrees bit for bit (tested against the package, and the parts the
package's own compressor writes are the ones dtypelab's quantizer stores).

The one liberty: dtypelab's symmetric integers use all 2^bits codes with a signed scale (see
:mod:`dtypelab.quant.qtensor`); the arithmetic above is unchanged by the sign. Activations (``:a8``,
``:afp8``) are declared dynamic, as dtypelab emulates them: int8 per token with absmax / 127 (vLLM's
kernel; the package's own Python fake-quantization uses absmax / 127.5), fp8 per tensor.

Each on-disk format is one registered :class:`Layout` class (``@register``), as the compressed-tensors
package registers one compressor per format: its stored parts from a shape, and packing to and from a
:class:`~dtypelab.quant.QuantizedTensor`. Adding a format is adding a class; :func:`convert_support`
says, for any format, whether ``convert`` can write it and why not. Checkpoint stage: builds on
:mod:`dtypelab.quant` and :mod:`dtypelab.formats`.
"""

from __future__ import annotations

import functools
import math
import sys
from dataclasses import dataclass

import torch

from ..errors import InputError
from ..formats import (
    E2M1,
    E4M3,
    SCALE_DTYPES,
    FloatCodec,
    Granularity,
    IntCodec,
    NumberFormat,
    TableCodec,
    get_format,
)
from ..quant import QuantizedTensor, pack_bits, pack_nibbles, unpack_bits, unpack_nibbles
from .safetensors_file import DTYPE_CODES

QUANT_METHOD = "compressed-tensors"


SUPPORTED = ("int8, int4, int3, int2 (any :gN / :channel / :tensor, :asym, :a8 / :afp8), fp8_e4m3, mxfp4, "
             "mxfp8 and nvfp4")


PACKED_INT_BITS = (2, 3, 4, 8)  # integer widths written as pack-quantized (vLLM's kernels: 4 and 8)


MX_BLOCK = 32  # elements per e8m0 scale in the OCP MX formats and in the package's MX layouts


MX_SCALE_DTYPE = torch.uint8  # how the package stores an e8m0 scale: its exponent byte


NVFP4_BLOCK = 16  # elements per e4m3 scale in NVFP4 (the package's NVFP4 schemes, vLLM's kernels)


NVFP4_SCALE_DTYPE = torch.float8_e4m3fn  # NVFP4's stored block scale (the NVFP4A16 preset's scale_dtype)


FLOAT_SCALES = ("fp32", "fp16", "bf16")  # the scale formats compressed-tensors stores


_SCALE_OPTIONS = {SCALE_DTYPES[name]: f"s{name}" for name in FLOAT_SCALES}  # stored dtype -> spec option


_ACTIVATIONS = {  # dtypelab's dynamic activation quantization as compressed-tensors input args
    "int8": {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "token", "dynamic": True},
    "fp8": {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "tensor", "dynamic": True},
}


@dataclass(frozen=True)
class StoredPart:
    """One tensor a quantized layer is stored as: ``suffix`` (``"weight_scale"``), dtype and shape."""

    suffix: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def convert_support(fmt: NumberFormat) -> str | None:
    """Why ``dtypelab convert`` cannot write ``fmt``, in one line; None when it can.

    Plain formats (fp32, fp16, bf16, fp8 with ``:cast``) are written as a cast of every floating tensor,
    scaled ones in their compressed-tensors layout; the reason names what to use instead (for the
    ``compare`` table's rows).
    """
    if fmt.raw_castable:
        return None if fmt.torch_dtype in DTYPE_CODES else f"{fmt.name}: safetensors has no dtype to store it"
    return _layout_problem(fmt)


def check_supported(fmt: NumberFormat) -> None:
    """Raise unless ``fmt`` has an exact compressed-tensors layout (the schemes vLLM serves).

    Raises:
        InputError: naming the format, why it has none, and what to use.
    """
    problem = _layout_problem(fmt)
    if problem:
        raise InputError(problem)


def compression_format(fmt: NumberFormat) -> str:
    """The compressed-tensors format name, chosen as the package's own inference chooses it."""
    if fmt.tensor_scale:
        return "nvfp4-pack-quantized"
    if _is_mx(fmt):
        return "mxfp4-pack-quantized" if fmt.bits == 4 else "mxfp8-quantized"
    integer = isinstance(fmt.codec, IntCodec)
    if fmt.activations:
        return "int-quantized" if integer else "float-quantized"
    return "pack-quantized" if integer else "naive-quantized"


def weight_args(fmt: NumberFormat) -> dict:
    """``QuantizationArgs`` of the weights, as JSON."""
    args = {"num_bits": fmt.bits, "type": "int" if isinstance(fmt.codec, IntCodec) else "float",
            "symmetric": fmt.symmetric, "strategy": fmt.granularity,
            "group_size": fmt.group_size if fmt.granularity == Granularity.GROUP else None, "dynamic": False}
    if _is_mx(fmt):  # the MXFP4A16 / MXFP8A16 presets: e8m0 scales as uint8 (mxfp8-quantized requires it)
        args["scale_dtype"] = str(MX_SCALE_DTYPE)
    if fmt.tensor_scale:  # the NVFP4A16 preset: a global scale per tensor, e4m3 scales per 16
        args.update(strategy="tensor_group", scale_dtype=str(NVFP4_SCALE_DTYPE))
    return args


def quantization_config(fmt: NumberFormat | dict[str, NumberFormat], ignore: list[str]) -> dict:
    """The ``quantization_config`` of config.json: one scheme for every Linear but ``ignore``; or, for a
    mixed-precision plan (layer -> format), one config group per scheme with ``targets`` listing its
    layers by name, and the top-level format ``mixed-precision`` when the groups' formats differ."""
    if not isinstance(fmt, dict):
        return _config({"group_0": _scheme(fmt, ["Linear"])}, compression_format(fmt), ignore)
    by_scheme: dict[str, tuple[NumberFormat, list[str]]] = {}
    for layer, layer_fmt in sorted(fmt.items()):
        by_scheme.setdefault(layer_fmt.name, (layer_fmt, []))[1].append(layer)
    groups = {f"group_{i}": _scheme(group_fmt, layers)
              for i, (group_fmt, layers) in enumerate(by_scheme.values())}
    formats = {compression_format(group_fmt) for group_fmt, _ in by_scheme.values()}
    return _config(groups, formats.pop() if len(formats) == 1 else MIXED_FORMAT, ignore)


MIXED_FORMAT = "mixed-precision"  # compressed-tensors' name for config groups of different formats


def _scheme(fmt: NumberFormat, targets: list[str]) -> dict:
    return {"targets": targets, "weights": weight_args(fmt),
            "input_activations": dict(_ACTIVATIONS[fmt.activations]) if fmt.activations else None,
            "output_activations": None, "format": compression_format(fmt)}


def _config(groups: dict, top_format: str, ignore: list[str]) -> dict:
    return {"quant_method": QUANT_METHOD, "format": top_format, "quantization_status": "compressed",
            "config_groups": groups, "ignore": sorted(ignore), "kv_cache_scheme": None}


def format_from_scheme(scheme: dict, scale_dtype: torch.dtype) -> NumberFormat:
    """The dtypelab format a compressed-tensors scheme stores (inverse of :func:`quantization_config`).

    Raises:
        InputError: a scheme dtypelab cannot hold (other bit widths, block strategies, NVFP4 W4A4, ...).
    """
    weights, activations = scheme.get("weights") or {}, scheme.get("input_activations")
    if weights.get("strategy") == "tensor_group":
        return _nvfp4_format(weights, activations, scale_dtype)
    if scale_dtype == MX_SCALE_DTYPE and weights.get("type") == "float":
        return _mx_format(weights, activations)
    base = {("int", 8): "int8", ("int", 4): "int4", ("int", 3): "int3", ("int", 2): "int2",
            ("float", 8): "fp8_e4m3"}.get(
        (weights.get("type"), weights.get("num_bits")))
    layout = {"channel": "channel", "tensor": "tensor", "group": f"g{weights.get('group_size')}"}.get(
        weights.get("strategy"))
    if base is None or layout is None or scale_dtype not in _SCALE_OPTIONS:
        raise InputError(f"compressed-tensors scheme {weights} ({scale_dtype} scales) is not one dtypelab "
                         f"loads: it holds {SUPPORTED} with fp32 / fp16 / bf16 scales")
    if activations and activations.get("dynamic") is not True:
        raise InputError("the checkpoint's activations use stored (static) scales; dtypelab emulates "
                         "dynamic activation quantization only: load a weight-only or dynamic checkpoint")
    options = [layout, "sym" if weights.get("symmetric", True) else "asym", _SCALE_OPTIONS[scale_dtype]]
    if activations:
        options.append("a8" if activations.get("type") == "int" else "afp8")
    return get_format(":".join([base, *options]))


def _layout_problem(fmt: NumberFormat) -> str | None:
    """Why ``fmt`` has no exact compressed-tensors layout (one line), or None when it has one."""
    codec, name = fmt.codec, fmt.name
    if not fmt.is_quantized:
        return f"{name} has no compressed-tensors layout: it stores no scale (convert casts to it instead)"
    if isinstance(codec, TableCodec):
        return (f"{name} has no compressed-tensors layout (the package defines none for lookup-table codes; "
                "bitsandbytes stores NF4 differently): use int4:g64 or mxfp4")
    if fmt.tensor_scale:
        return None if not fmt.activations else (
            f"{name} has no compressed-tensors layout: the package's NVFP4 scheme quantizes activations in "
            "fp4 blocks of 16 with a global scale, dtypelab's :a8 / :afp8 per token / tensor: drop the "
            "option")
    if isinstance(codec, FloatCodec) and codec not in (E4M3, E2M1):
        return (f"{name} has no compressed-tensors layout (the package's 8-bit floats are e4m3 only): use "
                f"fp8_e4m3, or {fmt.base}:cast for a plain cast without scales")
    if _is_mx(fmt):
        return None if not fmt.activations else (
            f"{name} has no compressed-tensors layout: the package's MX schemes quantize activations in MX "
            "blocks (its MXFP4 / MXFP8 presets), dtypelab's :a8 / :afp8 per token / tensor: drop the option")
    packable = isinstance(codec, IntCodec) and codec.bits in PACKED_INT_BITS
    if not (packable or codec == E4M3 and not fmt.fixed_layout):
        return f"{name} has no compressed-tensors layout: use {SUPPORTED}"
    if fmt.scale_format not in FLOAT_SCALES:
        return f"{name}: compressed-tensors stores fp32 / fp16 / bf16 scales: drop the scale option"
    return None


def _is_mx(fmt: NumberFormat) -> bool:
    """An OCP MX format the package has a layout for: e2m1 or e4m3 elements, an e8m0 scale per 32."""
    return (fmt.codec in (E2M1, E4M3) and fmt.scale_format == "e8m0" and fmt.granularity == Granularity.GROUP
            and fmt.group_size == MX_BLOCK and not fmt.tensor_scale)


def _mx_format(weights: dict, activations: dict | None) -> NumberFormat:
    """mxfp4 / mxfp8 from an MX scheme (uint8 scales); the package's other MX variants are refused."""
    bits, group_size = weights.get("num_bits"), weights.get("group_size")
    if bits not in (4, 8) or weights.get("strategy") != "group" or group_size != MX_BLOCK:
        raise InputError(f"compressed-tensors scheme {weights} (e8m0 scales) is not one dtypelab loads: it "
                         f"holds mxfp4 and mxfp8, fp4 / fp8 with one scale per group of {MX_BLOCK}")
    if activations:
        raise InputError("the checkpoint quantizes activations in MX blocks; dtypelab loads MX weight-only "
                         "checkpoints (the MXFP4A16 / MXFP8A16 schemes)")
    return get_format("mxfp4" if bits == 4 else "mxfp8")


def _nvfp4_format(weights: dict, activations: dict | None, scale_dtype: torch.dtype) -> NumberFormat:
    """nvfp4 from a ``tensor_group`` scheme (the NVFP4A16 preset); the package's others are refused."""
    args = (weights.get("num_bits"), weights.get("type"), weights.get("group_size"))
    nvfp4 = args == (4, "float", NVFP4_BLOCK)
    if not nvfp4 or not weights.get("symmetric", True) or scale_dtype != NVFP4_SCALE_DTYPE:
        raise InputError(f"compressed-tensors scheme {weights} ({scale_dtype} scales) is not one dtypelab "
                         f"loads: its tensor_group scheme is nvfp4, symmetric fp4 with {NVFP4_SCALE_DTYPE} "
                         f"scales per {NVFP4_BLOCK} and one global scale per tensor")
    if activations:
        raise InputError("the checkpoint quantizes activations in fp4 blocks (the NVFP4 scheme); dtypelab "
                         "loads NVFP4 weight-only checkpoints (the NVFP4A16 scheme)")
    return get_format("nvfp4")


# ------------------------------------------------------------------------------- the layout registry

class Layout:
    """One compressed-tensors format: the parts a quantized weight is stored as, and their packing.

    Subclasses set ``name`` (the package's format name, as config.json's ``format`` says) and register
    with :func:`register`; :func:`layout_for` picks the class of a format.
    """

    name: str = ""

    def stored_parts(self, fmt: NumberFormat, shape: tuple[int, int]) -> list[StoredPart]:
        """The parts a (rows, cols) weight is stored as, from its shape alone (for planning a file)."""
        raise NotImplementedError

    def to_parts(self, qt: QuantizedTensor, shape: tuple[int, int] | None = None) -> dict[str, torch.Tensor]:
        """``qt`` as its parts (the order of :meth:`stored_parts`), sharing no memory with it."""
        raise NotImplementedError

    def from_parts(self, fmt: NumberFormat, parts: dict[str, torch.Tensor],
                   shape: tuple[int, int]) -> QuantizedTensor:
        """Rebuild the :class:`QuantizedTensor` that :meth:`to_parts` stored (rows, cols = ``shape``)."""
        raise NotImplementedError


LAYOUTS: dict[str, Layout] = {}
"""compressed-tensors format name -> its layout."""


def register(cls: type[Layout]) -> type[Layout]:
    """Class decorator: add a :class:`Layout` to :data:`LAYOUTS` under its ``name``."""
    if not cls.name or cls.name in LAYOUTS:
        raise ValueError(f"layout {cls.__name__} needs a new, non-empty name (got {cls.name!r})")
    LAYOUTS[cls.name] = cls()
    return cls


def layout_for(fmt: NumberFormat) -> Layout:
    """The layout ``fmt`` is stored in (:func:`compression_format` names it)."""
    return LAYOUTS[compression_format(fmt)]


def stored_parts(fmt: NumberFormat, shape: tuple[int, int]) -> list[StoredPart]:
    """The parts a (rows, cols) weight in ``fmt`` is stored as (see :meth:`Layout.stored_parts`)."""
    return layout_for(fmt).stored_parts(fmt, shape)


def to_parts(qt: QuantizedTensor, shape: tuple[int, int] | None = None) -> dict[str, torch.Tensor]:
    """``qt`` in its layout's parts. Row chunks of a tensor (a multiple of 32 rows) give the rows of
    every part in order, so a writer can append chunk after chunk; ``shape`` is then the whole
    tensor's, for ``weight_shape``."""
    return layout_for(qt.fmt).to_parts(qt, shape)


def from_parts(fmt: NumberFormat, parts: dict[str, torch.Tensor], shape: tuple[int, int]) -> QuantizedTensor:
    """Rebuild the :class:`QuantizedTensor` that :func:`to_parts` stored."""
    return layout_for(fmt).from_parts(fmt, parts, shape)


@register
class PackQuantized(Layout):
    """int4 / int8 weight-only: codes packed into int32 words, the shape stored beside them."""

    name = "pack-quantized"

    def stored_parts(self, fmt: NumberFormat, shape: tuple[int, int]) -> list[StoredPart]:
        rows, cols = shape
        scale = _scale_part(fmt, rows, cols)
        parts = [StoredPart("weight_packed", torch.int32, (rows, _words(cols, fmt.bits))), scale,
                 StoredPart("weight_shape", torch.int64, (2,))]
        if not fmt.symmetric:
            zp_shape = (1,) if fmt.granularity == Granularity.TENSOR else (_words(rows, fmt.bits),
                                                                             scale.shape[1])
            parts.append(StoredPart("weight_zero_point", torch.int8 if zp_shape == (1,) else torch.int32,
                                    zp_shape))
        return parts

    def to_parts(self, qt: QuantizedTensor, shape: tuple[int, int] | None = None) -> dict[str, torch.Tensor]:
        fmt, scale = qt.fmt, _stored_scale(qt)
        parts = {"weight_packed": _packed_words(qt), "weight_scale": scale,
                 "weight_shape": torch.tensor(shape or qt.shape, dtype=torch.int64)}
        if not fmt.symmetric:
            zp = qt.zero_point.reshape(scale.shape)
            parts["weight_zero_point"] = (_shift(zp, fmt.bits) if fmt.granularity == Granularity.TENSOR
                                          else _pack_codes(zp.t().contiguous(), fmt.bits).t().contiguous())
        return parts

    def from_parts(self, fmt: NumberFormat, parts: dict[str, torch.Tensor],
                   shape: tuple[int, int]) -> QuantizedTensor:
        rows, cols = shape
        scale, zp = _scale_view(fmt, parts, rows), parts.get("weight_zero_point")
        data = _stored_codes(fmt, parts["weight_packed"], cols)
        if not fmt.symmetric and fmt.granularity == Granularity.TENSOR:
            zp = _unshift(zp, fmt.bits).reshape(scale.shape)
        elif not fmt.symmetric:
            zp = _unpack_codes(zp.t().contiguous(), fmt.bits, rows).t().reshape(scale.shape)
        return QuantizedTensor(fmt, shape, data, scale, zp)


def _stored_codes(fmt: NumberFormat, words: torch.Tensor, cols: int) -> torch.Tensor:
    """Packed words -> codes as dtypelab holds them: symmetric two's complement (int8, nibbles or words,
    their sign bits flipped back), asymmetric unsigned as stored."""
    if fmt.bits not in BYTE_ALIGNED_BITS:  # 2, 3 bits: held as the file's words
        return words.clone() if not fmt.symmetric else words ^ _sign_mask_words(fmt.bits, cols, words.device)
    data = _unpack_words(words, fmt.bits, cols)
    if not fmt.symmetric:
        return data
    data = _flip_sign_bits(data, fmt.bits)
    return data.view(torch.int8) if fmt.bits == 8 else data


@register
class NaiveQuantized(Layout):
    """fp8 weight-only: one float8 (or int8) element per weight, unpacked, with its scales."""

    name = "naive-quantized"

    def stored_parts(self, fmt: NumberFormat, shape: tuple[int, int]) -> list[StoredPart]:
        rows, cols = shape
        scale = _scale_part(fmt, rows, cols)
        parts = [StoredPart("weight", _naive_dtype(fmt), (rows, cols)), scale]
        return parts + ([] if fmt.symmetric else [StoredPart("weight_zero_point", torch.int8, scale.shape)])

    def to_parts(self, qt: QuantizedTensor, shape: tuple[int, int] | None = None) -> dict[str, torch.Tensor]:
        scale = _stored_scale(qt)
        parts = {"weight": _signed_codes(qt), "weight_scale": scale}
        if not qt.fmt.symmetric:
            parts["weight_zero_point"] = _shift(qt.zero_point.reshape(scale.shape), qt.fmt.bits)
        return parts

    def from_parts(self, fmt: NumberFormat, parts: dict[str, torch.Tensor],
                   shape: tuple[int, int]) -> QuantizedTensor:
        scale, zp = _scale_view(fmt, parts, shape[0]), parts.get("weight_zero_point")
        zp = None if zp is None else _unshift(zp, fmt.bits).reshape(scale.shape)
        return QuantizedTensor(fmt, shape, _from_signed(parts["weight"], fmt), scale, zp)


@register
class IntQuantized(NaiveQuantized):
    """int8 weights with dynamic activation quantization (``:a8`` / ``:afp8``): the naive parts."""

    name = "int-quantized"


@register
class FloatQuantized(NaiveQuantized):
    """fp8 weights with dynamic activation quantization: the naive parts."""

    name = "float-quantized"


class _MxLayout(Layout):
    """The MX layouts: the element codes as dtypelab stores them, and each e8m0 scale as its exponent
    byte (``2^(byte - 127)``), one per 32 inputs of a row. Subclasses name the codes' part and dtype."""

    codes_suffix: str = ""
    codes_dtype: torch.dtype = torch.uint8

    def stored_parts(self, fmt: NumberFormat, shape: tuple[int, int]) -> list[StoredPart]:
        rows, cols = shape
        width = cols // 2 if fmt.bits == 4 else cols  # 4 bits: two codes a byte
        return [StoredPart(self.codes_suffix, self.codes_dtype, (rows, width)),
                StoredPart("weight_scale", MX_SCALE_DTYPE, (rows, cols // fmt.group_size))]

    def to_parts(self, qt: QuantizedTensor, shape: tuple[int, int] | None = None) -> dict[str, torch.Tensor]:
        scale = qt.scale.reshape(qt.shape[0], -1).view(MX_SCALE_DTYPE)  # e8m0's bits are the exponent byte
        return {self.codes_suffix: qt.data.view(self.codes_dtype).clone(), "weight_scale": scale.clone()}

    def from_parts(self, fmt: NumberFormat, parts: dict[str, torch.Tensor],
                   shape: tuple[int, int]) -> QuantizedTensor:
        scale = parts["weight_scale"].view(SCALE_DTYPES[fmt.scale_format]).reshape(shape[0], -1, 1)
        return QuantizedTensor(fmt, shape, parts[self.codes_suffix].view(self.codes_dtype), scale)


@register
class Mxfp4PackQuantized(_MxLayout):
    """mxfp4: e2m1 codes two a byte (element 2k in the low nibble, index = e2m1 code), uint8 e8m0 scales."""

    name = "mxfp4-pack-quantized"
    codes_suffix = "weight_packed"


@register
class Mxfp8Quantized(_MxLayout):
    """mxfp8: one float8_e4m3fn element per weight, uint8 e8m0 scales."""

    name = "mxfp8-quantized"
    codes_suffix, codes_dtype = "weight", torch.float8_e4m3fn


@register
class Nvfp4PackQuantized(Layout):
    """nvfp4: e2m1 codes two a byte (as mxfp4), float8_e4m3fn scales per 16, the fp32 global scale g.

    ``weight_global_scale`` is dtypelab's ``tensor_scale`` as it is: both are the divisor g, so the parts
    are the stored tensor, byte for byte, and decompress to dtypelab's weights exactly.
    """

    name = "nvfp4-pack-quantized"

    def stored_parts(self, fmt: NumberFormat, shape: tuple[int, int]) -> list[StoredPart]:
        rows, cols = shape
        return [StoredPart("weight_packed", torch.uint8, (rows, cols // 2)),
                StoredPart("weight_scale", NVFP4_SCALE_DTYPE, (rows, cols // fmt.group_size)),
                StoredPart("weight_global_scale", torch.float32, (1,))]

    def to_parts(self, qt: QuantizedTensor, shape: tuple[int, int] | None = None) -> dict[str, torch.Tensor]:
        return {"weight_packed": qt.data.clone(), "weight_scale": qt.scale.reshape(qt.shape[0], -1).clone(),
                "weight_global_scale": qt.tensor_scale.reshape(1).clone()}

    def from_parts(self, fmt: NumberFormat, parts: dict[str, torch.Tensor],
                   shape: tuple[int, int]) -> QuantizedTensor:
        """Raises InputError when the global scale is missing or not one float32 (the package divides by
        it in its own dtype, so another dtype would decompress to other weights)."""
        global_scale = parts.get("weight_global_scale")
        if global_scale is None or global_scale.dtype != torch.float32 or global_scale.numel() != 1:
            found = "none" if global_scale is None else f"{global_scale.dtype} {list(global_scale.shape)}"
            raise InputError(f"nvfp4 weight needs weight_global_scale, one float32 (found {found}): the "
                             "checkpoint is not the package's NVFP4A16 layout")
        scale = parts["weight_scale"].view(NVFP4_SCALE_DTYPE).reshape(shape[0], -1, 1)
        return QuantizedTensor(fmt, shape, parts["weight_packed"].view(torch.uint8), scale,
                               tensor_scale=global_scale.reshape(1))


def _scale_part(fmt: NumberFormat, rows: int, cols: int) -> StoredPart:
    blocks = cols // fmt.group_size if fmt.granularity == Granularity.GROUP else 1
    shape = (1,) if fmt.granularity == Granularity.TENSOR else (rows, blocks)
    return StoredPart("weight_scale", SCALE_DTYPES[fmt.scale_format], shape)


def _stored_scale(qt: QuantizedTensor) -> torch.Tensor:
    rows = qt.shape[0]
    scale = qt.scale.reshape(1) if qt.fmt.granularity == Granularity.TENSOR else qt.scale.reshape(rows, -1)
    return scale.clone()


def _scale_view(fmt: NumberFormat, parts: dict[str, torch.Tensor], rows: int) -> torch.Tensor:
    return parts["weight_scale"].reshape(1 if fmt.granularity == Granularity.TENSOR else rows, -1, 1)


@functools.cache
def stored_suffixes() -> frozenset[str]:
    """Every part suffix any registered layout stores (``weight_packed``, ``weight_scale``, ...)."""
    probes = [get_format(s) for s in ("int4:g32:asym", "int8:channel:asym", "fp8_e4m3", "int8:a8:asym",
                                      "mxfp4", "mxfp8", "nvfp4")]
    return frozenset(p.suffix for fmt in probes for p in layout_for(fmt).stored_parts(fmt, (32, 32)))


# ------------------------------------------------------------------------------ packing helpers

WHOLE_TENSOR_PARTS = frozenset({"weight_shape"})
"""Parts that describe the whole tensor: a writer appending row chunks writes them once."""


def _words(count: int, bits: int) -> int:
    return -(-count * bits // 32)


def _naive_dtype(fmt: NumberFormat) -> torch.dtype:
    return torch.int8 if isinstance(fmt.codec, IntCodec) else torch.float8_e4m3fn


def _sign_mask(bits: int) -> int:
    """The top bit of every code in a byte: flipping it maps two's complement onto ``q + 2^(bits-1)``."""
    return 0x88 if bits == 4 else 0x80


def _flip_sign_bits(data: torch.Tensor, bits: int) -> torch.Tensor:
    return data.view(torch.uint8) ^ _sign_mask(bits)


BYTE_ALIGNED_BITS = (4, 8)
"""Code widths dtypelab stores as bytes (nibbles, bytes) that become words by reinterpretation; other
widths (2, 3) are held as the file's densely packed int32 words already."""


def _packed_words(qt: QuantizedTensor) -> torch.Tensor:
    """``weight_packed``: each row's ``q + 2^(bits-1)`` codes packed into int32 words."""
    if qt.fmt.bits in BYTE_ALIGNED_BITS:
        return _pack_words(_unsigned_codes(qt))
    if not qt.fmt.symmetric:
        return qt.data.clone()
    return qt.data ^ _sign_mask_words(qt.fmt.bits, qt.shape[1], qt.data.device)


def _sign_mask_words(bits: int, cols: int, device: torch.device) -> torch.Tensor:
    """(1, words) int32 with the top bit of every code of a row set: XOR maps two's complement codes onto
    ``q + 2^(bits-1)`` and back, word by word."""
    return pack_bits(torch.full((1, cols), 1 << (bits - 1), dtype=torch.uint8, device=device), bits)


def _unsigned_codes(qt: QuantizedTensor) -> torch.Tensor:
    """Stored bytes (packed nibbles for 4 bits) holding ``q + 2^(bits-1)``."""
    if qt.fmt.symmetric:
        return _flip_sign_bits(qt.data, qt.fmt.bits)
    return qt.data.view(torch.uint8)


def _pack_words(stored: torch.Tensor) -> torch.Tensor:
    """(rows, bytes) uint8 as dtypelab stores codes (4 bits: two per byte) -> (rows, words) int32.

    Element ``i`` at bits ``i * bits`` of little-endian words is exactly byte order plus nibble order.
    """
    _require_little_endian()
    rows, width = stored.shape
    padded = torch.zeros(rows, width + -width % 4, dtype=torch.uint8, device=stored.device)
    padded[:, :width] = stored
    return padded.view(torch.int32)


def _require_little_endian() -> None:
    """Words are reinterpreted bytes: that matches the file's little-endian int32 on such hosts only."""
    if sys.byteorder != "little":
        raise InputError("the compressed-tensors packing is implemented for little-endian hosts only")


def _pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """(rows, count) unsigned codes, one per byte (zero points) -> (rows, words) int32."""
    if bits not in BYTE_ALIGNED_BITS:
        return pack_bits(codes, bits)
    return _pack_words(pack_nibbles(codes) if bits == 4 else codes)


def _unpack_words(words: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """(rows, words) int32 -> (rows, stored bytes) uint8 for ``count`` codes per row."""
    _require_little_endian()
    width = -(-count // 2) if bits == 4 else count
    return words.contiguous().view(torch.uint8)[:, :width].contiguous()


def _unpack_codes(words: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """(rows, words) int32 -> (rows, count) uint8 unsigned codes, one per byte (zero points)."""
    if bits not in BYTE_ALIGNED_BITS:
        return unpack_bits(words, bits, count)
    stored = _unpack_words(words, bits, count)
    return unpack_nibbles(stored, count) if bits == 4 else stored


def _shift(unsigned: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned codes ``u`` -> compressed-tensors' signed ``u - 2^(bits-1)`` as int8."""
    return (unsigned.to(torch.int16) - (1 << (bits - 1))).to(torch.int8)


def _unshift(signed: torch.Tensor, bits: int) -> torch.Tensor:
    return (signed.to(torch.int16) + (1 << (bits - 1))).to(torch.uint8)


def _signed_codes(qt: QuantizedTensor) -> torch.Tensor:
    """(rows, cols) compressed-tensors ``q`` as int8; fp8 keeps its float8 codes."""
    if isinstance(qt.fmt.codec, FloatCodec):
        return qt.data.clone()
    if not qt.fmt.symmetric:
        return _shift(qt.codes(), qt.fmt.bits)
    if qt.fmt.bits == 8:
        return qt.data.clone()
    return ((qt.codes().to(torch.int16) ^ 8) - 8).to(torch.int8)  # 4-bit two's complement -> -8..7


def _from_signed(weight: torch.Tensor, fmt: NumberFormat) -> torch.Tensor:
    """Inverse of :func:`_signed_codes`: codes as dtypelab stores them."""
    if isinstance(fmt.codec, FloatCodec):
        return weight.view(torch.float8_e4m3fn)
    codes = weight if fmt.symmetric else _unshift(weight, fmt.bits)
    return codes if fmt.bits == 8 else pack_nibbles(codes)
