"""Putting a model into a format: plain casts, quantized tensors and layers, and what they cost.

Quant stage, above :mod:`dtypelab.formats`: :func:`cast_model` for plain dtypes, :func:`quantize_model`
for scaled formats, :func:`round_trip` (the one rounding every analysis uses), the damage accounting
(:mod:`dtypelab.quant.damage`) and :func:`inspect_model` (what a model in a format holds).
"""

from .activations import quantize_activations
from .awq import clip_quantize, search_scales
from .calibrate import CalibrationReport, LayerCalibration, calibrate_layers
from .cast import KeepPolicy, cast_model, compute_dtype
from .damage import (
    Action,
    DamageCounts,
    TensorDamage,
    count_damage,
    dtype_name,
    overflow_threshold,
    quantization_damage,
    sqnr_from_powers,
)
from .footprint import (
    DtypeSummary,
    ModelInspection,
    TensorInfo,
    inspect_model,
    inspect_tensors,
    param_dtype_lines,
    print_param_dtype,
)
from .gptq import GptqResult, gptq_quantize
from .hessian import InputStats, output_sqnr_db
from .mixed import DENSE, PLAN_SCHEMA, LayerChoice, MixedPlan, layer_weights, model_fingerprint
from .model import (
    HEAD_REASON,
    KEPT_REASON,
    PLAN_DENSE_REASON,
    LayerOutcome,
    QuantizeResult,
    head_names,
    linear_candidates,
    quantize_model,
)
from .nn import (
    DEQUANTIZE_ONCE_BUDGET_BYTES,
    DequantizedOnce,
    QuantizedEmbedding,
    QuantizedLinear,
    QuantizedWeightModule,
    dequantized_once,
    int8_matmul,
    is_conv1d,
)
from .packing import pack_bits, pack_nibbles, unpack_bits, unpack_nibbles
from .qtensor import QuantizedTensor, quantize_tensor, round_trip, saturated_count

__all__ = [
    "CalibrationReport", "GptqResult", "InputStats", "LayerCalibration", "calibrate_layers", "clip_quantize",
    "gptq_quantize", "output_sqnr_db", "search_scales",
    "HEAD_REASON", "KEPT_REASON", "head_names", "DENSE", "PLAN_SCHEMA", "LayerChoice", "MixedPlan",
    "layer_weights", "model_fingerprint", "PLAN_DENSE_REASON", "linear_candidates",
    "Action", "DamageCounts", "DtypeSummary", "KeepPolicy", "LayerOutcome", "ModelInspection",
    "QuantizeResult", "QuantizedEmbedding", "QuantizedLinear", "QuantizedTensor", "QuantizedWeightModule",
    "TensorDamage", "is_conv1d", "DEQUANTIZE_ONCE_BUDGET_BYTES", "DequantizedOnce", "dequantized_once",
    "int8_matmul",
    "TensorInfo", "cast_model", "compute_dtype", "count_damage", "dtype_name", "inspect_model",
    "inspect_tensors", "overflow_threshold", "pack_bits", "pack_nibbles", "param_dtype_lines",
    "print_param_dtype",
    "quantization_damage", "quantize_activations", "quantize_model", "quantize_tensor", "round_trip",
    "saturated_count", "sqnr_from_powers", "unpack_bits", "unpack_nibbles",
]
