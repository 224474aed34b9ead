"""Putting a model into a format: plain casts, quantized tensors and layers, and what they cost.

Quant stage, above :mod:`dtypelab.formats`: :func:`cast_model` for plain dtypes, :func:`quantize_model`
for scaled formats, :func:`round_trip` (the one rounding every analysis uses), the damage accounting
(:mod:`dtypelab.quant.damage`) and :func:`inspect_model` (what a model in a format holds).
"""

from ..lazy import lazy_exports

_EXPORTS = {  # public name -> the submodule that defines it (imported on first use)
    "quantize_activations": "activations",
    "clip_quantize": "awq", "search_scales": "awq",
    "CalibrationReport": "calibrate", "LayerCalibration": "calibrate", "calibrate_layers": "calibrate",
    "KeepPolicy": "cast", "cast_model": "cast", "compute_dtype": "cast",
    "Action": "damage", "DamageCounts": "damage", "TensorDamage": "damage", "count_damage": "damage",
    "dtype_name": "damage", "overflow_threshold": "damage", "quantization_damage": "damage",
    "quantize_counted": "damage", "read_back_damage": "damage", "sqnr_from_powers": "damage",
    "DtypeSummary": "footprint", "ModelInspection": "footprint", "TensorInfo": "footprint",
    "inspect_model": "footprint", "inspect_tensors": "footprint", "param_dtype_lines": "footprint",
    "print_param_dtype": "footprint",
    "GptqResult": "gptq", "gptq_quantize": "gptq",
    "InputStats": "hessian", "output_sqnr_db": "hessian",
    "DENSE": "mixed", "PLAN_SCHEMA": "mixed", "LayerChoice": "mixed", "MixedPlan": "mixed",
    "layer_weights": "mixed", "model_fingerprint": "mixed",
    "HEAD_REASON": "model", "KEPT_REASON": "model", "PLAN_DENSE_REASON": "model", "LayerOutcome": "model",
    "QuantizeResult": "model", "head_names": "model", "linear_candidates": "model", "quantize_model": "model",
    "DEQUANTIZE_ONCE_BUDGET_BYTES": "nn", "DequantizedOnce": "nn", "QuantizedEmbedding": "nn",
    "QuantizedLinear": "nn", "QuantizedWeightModule": "nn", "dequantized_once": "nn", "int8_matmul": "nn",
    "computing_in": "nn", "is_conv1d": "nn",
    "pack_bits": "packing", "pack_nibbles": "packing", "unpack_bits": "packing", "unpack_nibbles": "packing",
    "QuantizedTensor": "qtensor", "ReadBack": "qtensor", "Workspace": "qtensor",
    "quantize_read_back": "qtensor", "quantize_tensor": "qtensor", "round_trip": "qtensor",
    "saturated_count": "qtensor",
}

__all__ = [
    "CalibrationReport", "GptqResult", "InputStats", "LayerCalibration", "calibrate_layers", "clip_quantize",
    "gptq_quantize", "output_sqnr_db", "search_scales",
    "HEAD_REASON", "KEPT_REASON", "head_names", "DENSE", "PLAN_SCHEMA", "LayerChoice", "MixedPlan",
    "layer_weights", "model_fingerprint", "PLAN_DENSE_REASON", "linear_candidates",
    "Action", "DamageCounts", "DtypeSummary", "KeepPolicy", "LayerOutcome", "ModelInspection",
    "QuantizeResult", "QuantizedEmbedding", "QuantizedLinear", "QuantizedTensor", "QuantizedWeightModule",
    "TensorDamage", "is_conv1d", "DEQUANTIZE_ONCE_BUDGET_BYTES", "DequantizedOnce", "dequantized_once",
    "int8_matmul", "computing_in",
    "TensorInfo", "cast_model", "compute_dtype", "count_damage", "dtype_name", "inspect_model",
    "inspect_tensors", "overflow_threshold", "pack_bits", "pack_nibbles", "param_dtype_lines",
    "print_param_dtype",
    "quantization_damage", "quantize_activations", "quantize_counted", "quantize_model", "quantize_read_back",
    "quantize_tensor", "read_back_damage", "round_trip", "ReadBack", "Workspace",
    "saturated_count", "sqnr_from_powers", "unpack_bits", "unpack_nibbles",
]

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
