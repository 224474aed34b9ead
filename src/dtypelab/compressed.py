"""The compressed-tensors checkpoint layout (read by vLLM and transformers, written by llm-compressor).

A quantized ``nn.Linear`` called ``NAME`` is stored as parts next to its dense neighbours::

    pack-quantized   (int4 / int8 weight-only)   NAME.weight_packed  int32 (rows, ceil(cols * bits / 32))
                                                  NAME.weight_scale   (rows, 1) | (rows, groups) | (1,)
                                                  NAME.weight_shape   int64 [rows, cols]
                                                  NAME.weight_zero_point (asym) int32, packed along rows
    int-quantized    (int weights, :a8 / :afp8)  NAME.weight int8 (rows, cols), NAME.weight_scale, zp int8
    naive-quantized  (fp8 weight-only)           NAME.weight float8_e4m3fn (rows, cols), NAME.weight_scale
    float-quantized  (fp8, :a8 / :afp8)          the same parts

Packing: element ``i`` of a row sits at bits ``i * bits`` of the little-endian int32 words, as an
unsigned value ``q + 2^(bits-1)`` (compressed-tensors' ``pack_to_int32``). dtypelab's codes map onto it
without re-quantizing: symmetric codes are two's complement (flip the top bit of each code), asymmetric
codes are already unsigned and equal ``q + 2^(bits-1)`` with the zero point shifted the same way. The
value is always ``(q - zero_point) * scale``, so the layout decompresses to exactly the weights that
:func:`dtypelab.quantize_model` computes (tested against the package itself when it is installed).

The one liberty: dtypelab's symmetric integers use all 2^bits codes with a signed scale (see
:mod:`dtypelab.qtensor`); the arithmetic above is unchanged by the sign. Activations (``:a8``,
``:afp8``) are declared dynamic, as dtypelab emulates them: int8 per token with absmax / 127 (vLLM's
kernel; the package's own Python fake-quantization uses absmax / 127.5), fp8 per tensor.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .codecs import FloatCodec, IntCodec
from .errors import InputError, ModelSpecError
from .formats import E4M3, SCALE_DTYPES, NumberFormat, get_format
from .packing import pack_nibbles, unpack_nibbles
from .qtensor import QuantizedTensor

QUANT_METHOD = "compressed-tensors"
SUPPORTED = "int8, int4 (any :gN / :channel / :tensor, :asym, :a8 / :afp8) and fp8_e4m3"
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


def check_supported(fmt: NumberFormat) -> None:
    """Raise unless ``fmt`` has a compressed-tensors layout (the schemes vLLM serves).

    Raises:
        InputError: naming the format and the ones that work.
    """
    codec = fmt.codec
    int_ok = isinstance(codec, IntCodec) and codec.bits in (4, 8)
    fp8_ok = codec == E4M3 and not fmt.fixed_layout
    if not (int_ok or fp8_ok) or not fmt.is_quantized or fmt.tensor_scale:
        raise InputError(f"{fmt.name} has no compressed-tensors layout: use {SUPPORTED}")
    if fmt.scale_format not in FLOAT_SCALES:
        raise InputError(f"{fmt.name}: compressed-tensors stores fp32 / fp16 / bf16 scales: drop the "
                         "scale option")


def compression_format(fmt: NumberFormat) -> str:
    """The compressed-tensors format name, chosen as the package's own inference chooses it."""
    integer = isinstance(fmt.codec, IntCodec)
    if fmt.activations:
        return "int-quantized" if integer else "float-quantized"
    return "pack-quantized" if integer else "naive-quantized"


def weight_args(fmt: NumberFormat) -> dict:
    """``QuantizationArgs`` of the weights, as JSON."""
    return {"num_bits": fmt.bits, "type": "int" if isinstance(fmt.codec, IntCodec) else "float",
            "symmetric": fmt.symmetric, "strategy": fmt.granularity,
            "group_size": fmt.group_size if fmt.granularity == "group" else None, "dynamic": False}


def quantization_config(fmt: NumberFormat, ignore: list[str]) -> dict:
    """The ``quantization_config`` of config.json: one scheme for every Linear but ``ignore``."""
    scheme = {"targets": ["Linear"], "weights": weight_args(fmt),
              "input_activations": dict(_ACTIVATIONS[fmt.activations]) if fmt.activations else None,
              "output_activations": None,
              "format": compression_format(fmt)}
    return {"quant_method": QUANT_METHOD, "format": compression_format(fmt),
            "quantization_status": "compressed", "config_groups": {"group_0": scheme},
            "ignore": sorted(ignore), "kv_cache_scheme": None}


def format_from_scheme(scheme: dict, scale_dtype: torch.dtype) -> NumberFormat:
    """The dtypelab format a compressed-tensors scheme stores (inverse of :func:`quantization_config`).

    Raises:
        InputError: a scheme dtypelab cannot hold (other bit widths, block strategies, fp4, ...).
    """
    weights, activations = scheme.get("weights") or {}, scheme.get("input_activations")
    base = {("int", 8): "int8", ("int", 4): "int4", ("float", 8): "fp8_e4m3"}.get(
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


# ------------------------------------------------------------------------------------ stored parts

def stored_parts(fmt: NumberFormat, shape: tuple[int, int]) -> list[StoredPart]:
    """The parts a (rows, cols) weight is stored as, from its shape alone (for planning a file)."""
    rows, cols = shape
    blocks = cols // fmt.group_size if fmt.granularity == "group" else 1
    scale_shape = (1,) if fmt.granularity == "tensor" else (rows, blocks)
    scale = StoredPart("weight_scale", SCALE_DTYPES[fmt.scale_format], scale_shape)
    if compression_format(fmt) != "pack-quantized":
        parts = [StoredPart("weight", _naive_dtype(fmt), (rows, cols)), scale]
        return parts + ([] if fmt.symmetric else [StoredPart("weight_zero_point", torch.int8, scale_shape)])
    parts = [StoredPart("weight_packed", torch.int32, (rows, _words(cols, fmt.bits))), scale,
             StoredPart("weight_shape", torch.int64, (2,))]
    if not fmt.symmetric:
        zp_shape = (1,) if fmt.granularity == "tensor" else (_words(rows, fmt.bits), blocks)
        parts.append(StoredPart("weight_zero_point", torch.int8 if zp_shape == (1,) else torch.int32,
                                zp_shape))
    return parts


WHOLE_TENSOR_PARTS = frozenset({"weight_shape"})
"""Parts that describe the whole tensor: a writer appending row chunks writes them once."""


def to_parts(qt: QuantizedTensor, shape: tuple[int, int] | None = None) -> dict[str, torch.Tensor]:
    """``qt`` in the layout of :func:`stored_parts` (same order), sharing no memory with it.

    Row chunks of a tensor (a multiple of 32 rows) give the rows of every part in order, so a
    writer can append chunk after chunk; ``shape`` is then the whole tensor's, for ``weight_shape``.
    """
    fmt, rows = qt.fmt, qt.shape[0]
    scale = qt.scale.reshape(1) if fmt.granularity == "tensor" else qt.scale.reshape(rows, -1)
    if compression_format(fmt) != "pack-quantized":
        parts = {"weight": _signed_codes(qt), "weight_scale": scale.clone()}
        if not fmt.symmetric:
            parts["weight_zero_point"] = _shift(qt.zero_point.reshape(scale.shape), fmt.bits)
        return parts
    parts = {"weight_packed": _pack_words(_unsigned_codes(qt)), "weight_scale": scale.clone(),
             "weight_shape": torch.tensor(shape or qt.shape, dtype=torch.int64)}
    if not fmt.symmetric:
        zp = qt.zero_point.reshape(scale.shape)
        parts["weight_zero_point"] = (_shift(zp, fmt.bits) if fmt.granularity == "tensor"
                                      else _pack_codes(zp.t().contiguous(), fmt.bits).t().contiguous())
    return parts


def from_parts(fmt: NumberFormat, parts: dict[str, torch.Tensor],
               shape: tuple[int, int]) -> QuantizedTensor:
    """Rebuild the :class:`QuantizedTensor` that :func:`to_parts` stored (rows, cols = ``shape``)."""
    rows, cols = shape
    scale = parts["weight_scale"].reshape(1 if fmt.granularity == "tensor" else rows, -1, 1)
    zp = parts.get("weight_zero_point")
    if compression_format(fmt) != "pack-quantized":
        data = _from_signed(parts["weight"], fmt)
        zp = None if zp is None else _unshift(zp, fmt.bits).reshape(scale.shape)
        return QuantizedTensor(fmt, shape, data, scale, zp)
    data = _unpack_words(parts["weight_packed"], fmt.bits, cols)  # unsigned: asymmetric codes as they are
    if fmt.symmetric:
        data = _flip_sign_bits(data, fmt.bits)
        data = data.view(torch.int8) if fmt.bits == 8 else data
    elif fmt.granularity == "tensor":
        zp = _unshift(zp, fmt.bits).reshape(scale.shape)
    else:
        zp = _unpack_codes(zp.t().contiguous(), fmt.bits, rows).t().reshape(scale.shape)
    return QuantizedTensor(fmt, shape, data, scale, zp)


def _words(count: int, bits: int) -> int:
    return -(-count * bits // 32)


def _naive_dtype(fmt: NumberFormat) -> torch.dtype:
    return torch.int8 if isinstance(fmt.codec, IntCodec) else torch.float8_e4m3fn


def _sign_mask(bits: int) -> int:
    """The top bit of every code in a byte: flipping it maps two's complement onto ``q + 2^(bits-1)``."""
    return 0x88 if bits == 4 else 0x80


def _flip_sign_bits(data: torch.Tensor, bits: int) -> torch.Tensor:
    return data.view(torch.uint8) ^ _sign_mask(bits)


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
    return _pack_words(pack_nibbles(codes) if bits == 4 else codes)


def _unpack_words(words: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """(rows, words) int32 -> (rows, stored bytes) uint8 for ``count`` codes per row."""
    _require_little_endian()
    width = -(-count // 2) if bits == 4 else count
    return words.contiguous().view(torch.uint8)[:, :width].contiguous()


def _unpack_codes(words: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """(rows, words) int32 -> (rows, count) uint8 unsigned codes, one per byte (zero points)."""
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


# ------------------------------------------------------------------------------ model structure

def linear_layers(folder: Path) -> tuple[list[str], set[str]]:
    """The ``nn.Linear`` modules the folder's config.json builds, and the output head's name.

    The model is built on the meta device (no memory, no weights, no code from the folder): a
    checkpoint's names alone cannot tell a Linear weight from an embedding table.

    Raises:
        ModelSpecError: transformers missing, or a config it cannot build.
    """
    model = _meta_model(folder)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    linears = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    return linears, {name for name, module in model.named_modules() if head is not None and module is head}


def _meta_model(folder: Path) -> nn.Module:
    try:
        import transformers
    except ImportError:
        raise ModelSpecError("quantized outputs need transformers to read config.json: "
                             "pip install 'dtypelab[hf]'") from None
    from .models import first_line, model_class

    try:
        config = transformers.AutoConfig.from_pretrained(folder)
        cls = model_class(config)
        build = getattr(cls, "_from_config", None) or cls.from_config  # AutoModel: no architectures
        with torch.device("meta"):
            return build(config)
    except Exception as exc:  # noqa: BLE001 - a bad config.json raises many types; one line for each
        raise ModelSpecError(f"transformers cannot build the model of {folder / 'config.json'} "
                             f"({first_line(exc)}): "
                             "quantized outputs need an architecture your transformers knows") from None


# ---------------------------------------------------------------------------------------- loading

def load_quantized_weights(model: nn.Module, scheme: dict, tensors: dict[str, torch.Tensor]) -> list[str]:
    """Replace every Linear of ``model`` stored quantized in ``tensors`` with dtypelab's
    :class:`~dtypelab.quantize.QuantizedLinear`, built from the stored codes (nothing re-quantized).

    ``tensors`` (a checkpoint's state dict) loses the parts it used; what remains is dense.

    Returns:
        The names of the modules replaced.
    Raises:
        InputError: a stored layer that is not a Linear of the model, or a scheme dtypelab cannot hold.
    """
    from .quantize import QuantizedLinear, set_submodule

    names = sorted(key.removesuffix(".weight_scale") for key in tensors if key.endswith(".weight_scale"))
    for name in names:
        linear = _linear(model, name)
        parts = {suffix: tensors.pop(f"{name}.{suffix}") for suffix in _STORED_SUFFIXES
                 if f"{name}.{suffix}" in tensors}
        fmt = format_from_scheme(scheme, parts["weight_scale"].dtype)
        qt = from_parts(fmt, parts, (linear.out_features, linear.in_features))
        set_submodule(model, name, QuantizedLinear.from_qtensor(qt, linear.bias, linear.weight.dtype))
    return names


_STORED_SUFFIXES = ("weight", "weight_packed", "weight_scale", "weight_shape", "weight_zero_point")


def _linear(model: nn.Module, name: str) -> nn.Linear:
    try:
        module = model.get_submodule(name)
    except AttributeError:
        module = None
    if not isinstance(module, nn.Linear):
        raise InputError(f"checkpoint stores {name!r} quantized, but the model has no Linear layer of "
                         "that name: check config.json matches the weights")
    return module


def quantization_scheme(config: object) -> dict | None:
    """The one weight scheme of a compressed-tensors ``quantization_config`` (None when the config
    has none, or another quantization method).

    Raises:
        InputError: several config groups (per-layer schemes), which dtypelab does not load yet.
    """
    qconfig = getattr(config, "quantization_config", None)
    if not isinstance(qconfig, dict) or qconfig.get("quant_method") != QUANT_METHOD:
        return None
    groups = list((qconfig.get("config_groups") or {}).values())
    if len(groups) != 1 or not isinstance(groups[0], dict):
        raise InputError(f"quantization_config has {len(groups)} config groups; dtypelab loads "
                         "checkpoints with exactly one (one scheme for all quantized layers)")
    return groups[0]


def build_quantized_model(folder: Path, config: object, scheme: dict, model_cls: type,
                          dtype: torch.dtype | None) -> nn.Module:
    """A model from ``config`` (its quantization_config set aside) with the folder's weights: quantized
    layers as dtypelab modules, everything else loaded dense; ``dtype`` None takes config's dtype.

    The model is built in that dtype, as ``from_pretrained`` builds it (buffers such as rotary
    frequencies stay float32), rather than cast afterwards.
    """
    from safetensors.torch import load_file

    del config.quantization_config
    dtype = dtype or _config_dtype(config)
    model = model_cls._from_config(config, dtype=dtype) if hasattr(model_cls, "_from_config") \
        else model_cls(config).to(dtype)
    tensors = {k: v for file in sorted(folder.glob("*.safetensors")) for k, v in load_file(file).items()}
    replaced = load_quantized_weights(model, scheme, tensors)
    _load_dense(model, tensors, replaced, folder)
    return model.eval()


def _config_dtype(config: object) -> torch.dtype:
    """config.json's ``dtype`` (``torch_dtype`` in older files) as a torch dtype; float32 if unset."""
    value = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(value, str):
        value = getattr(torch, value, None)
    return value if isinstance(value, torch.dtype) and value.is_floating_point else torch.float32


def _load_dense(model: nn.Module, tensors: dict[str, torch.Tensor], replaced: list[str],
                folder: Path) -> None:
    """Load the dense tensors; any parameter left without a value (tied ones aside) is an error."""
    try:
        result = model.load_state_dict(tensors, strict=False)
    except RuntimeError as exc:
        raise InputError(f"{folder}: weights do not fit the model of config.json "
                         f"({str(exc).splitlines()[-1].strip()}): check the folder") from None
    buffers = {name for name, _ in model.named_buffers()}  # non-persistent ones (position_ids) too
    unexpected = [k for k in result.unexpected_keys if k not in buffers]  # those the model recomputes
    if unexpected:
        raise InputError(f"{folder}: tensors {unexpected[:3]} match no parameter of the model of "
                         "config.json: check the folder")
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    state, loaded = model.state_dict(), set(tensors)
    stored = {state[k].data_ptr() for k in loaded if k in state}
    codes = {f"{name}.{buffer}" for name in replaced for buffer in ("qweight", "scale", "zero_point",
                                                                    "tensor_scale")}  # set from parts
    missing = [k for k in result.missing_keys if k not in codes and state[k].data_ptr() not in stored]
    if missing:
        raise InputError(f"{folder}: no stored value for {missing[:3]}: the checkpoint is incomplete")
