"""dtypelab: what happens to my model in precision X?

The public API: the verbs a user calls and the results they get back. Each stage's subpackage
(:mod:`~dtypelab.formats`, :mod:`~dtypelab.quant`, :mod:`~dtypelab.checkpoint`, :mod:`~dtypelab.models`,
:mod:`~dtypelab.variants`, :mod:`~dtypelab.analysis`, :mod:`~dtypelab.report`) exports more in its own
``__all__``; ``docs/architecture.md`` draws how they stack.

Example:
    >>> import dtypelab
    >>> model = dtypelab.DummyModel()
    >>> result = dtypelab.compare_models(model, {"bf16": dtypelab.cast_model(model, "bf16")},
    ...                                  dtypelab.parse_token_ids("[[1, 0, 1]]"))
    >>> minilm = dtypelab.load("minilm")            # a real model, offline
    >>> dtypelab.compare_models(minilm.model, {"bf16": dtypelab.cast_model(minilm.model, "bf16")},
    ...                         dtypelab.model_inputs(minilm))   # the 64 bundled sentences
"""

from __future__ import annotations

from .lazy import lazy_exports
from .quiet import drop_known_noise

drop_known_noise()  # before any submodule can import transformers or a peer

_EXPORTS = {  # public name -> the stage subpackage that defines it (imported on first use)
    "ComparisonResult": "analysis", "HeadroomReport": "analysis", "LayerComparison": "analysis",
    "NextTokenMetrics": "analysis", "OutputMetrics": "analysis", "WeightReport": "analysis",
    "compare_layers": "analysis", "compare_models": "analysis", "next_token_metrics": "analysis",
    "noise_floor_db": "analysis", "output_metrics": "analysis", "predict_headroom": "analysis",
    "rounding_floor_db": "analysis", "variant_verdict": "analysis", "weight_stats": "analysis",
    "CheckpointInspection": "checkpoint", "ConversionResult": "checkpoint",
    "convert_checkpoint": "checkpoint", "inspect_checkpoint": "checkpoint", "read_header": "checkpoint",
    "Cancelled": "errors", "DtypelabError": "errors",
    "Granularity": "formats", "NumberFormat": "formats", "all_formats": "formats", "get_format": "formats",
    "format_table": "formats",
    "DummyModel": "models", "LoadedModel": "models", "ModelKind": "models", "OutputKind": "models",
    "build_model": "models", "default_texts": "models", "inspect": "models", "load": "models",
    "model_inputs": "models", "parse_token_ids": "models", "tokenize": "models",
    "ProgressCallback": "progress", "ProgressEvent": "progress",
    "KeepPolicy": "quant", "ModelInspection": "quant", "QuantizeResult": "quant", "TensorDamage": "quant",
    "cast_model": "quant", "inspect_model": "quant", "param_dtype_lines": "quant", "quantize_model": "quant",
    "round_trip": "quant", "print_param_dtype": "quant",
    "Variant": "variants", "apply_format": "variants", "build_variants": "variants",
    "parse_variant_specs": "variants",
}

__all__ = [
    "Cancelled", "CheckpointInspection", "ComparisonResult", "ConversionResult", "DtypelabError",
    "DummyModel", "Granularity", "HeadroomReport", "KeepPolicy", "LayerComparison", "LoadedModel",
    "ModelInspection", "ModelKind", "NextTokenMetrics", "NumberFormat", "OutputKind", "OutputMetrics",
    "ProgressCallback", "ProgressEvent", "QuantizeResult", "TensorDamage", "Variant", "WeightReport",
    "all_formats", "apply_format", "build_model", "build_variants", "cast_model", "compare_layers",
    "compare_models", "convert_checkpoint", "default_texts", "format_table", "get_format", "inspect",
    "inspect_checkpoint", "inspect_model", "load", "model_inputs", "next_token_metrics", "noise_floor_db",
    "output_metrics", "param_dtype_lines", "parse_token_ids", "parse_variant_specs", "predict_headroom",
    "print_param_dtype", "quantize_model", "read_header", "round_trip", "rounding_floor_db", "tokenize",
    "variant_verdict", "weight_stats",
]
__version__ = "0.1.0"

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)  # PEP 562: a stage imported on first use
