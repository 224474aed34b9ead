"""dtypelab: what happens to my model in precision X?

Example:
    >>> import dtypelab
    >>> model = dtypelab.DummyModel()
    >>> result = dtypelab.compare_models(model, {"bf16": dtypelab.cast_model(model, "bf16")},
    ...                                  dtypelab.parse_token_ids("[[1, 0, 1]]"))
    >>> minilm = dtypelab.load("minilm")            # a real model, offline
    >>> dtypelab.compare_models(minilm.model, {"bf16": dtypelab.cast_model(minilm.model, "bf16")},
    ...                         dtypelab.model_inputs(minilm))   # the 64 bundled sentences
"""

from .cast import KeepPolicy, cast_model
from .checkpoint import convert_checkpoint, inspect_checkpoint
from .compare import NextTokenMetrics, OutputMetrics, compare_models, next_token_metrics, output_metrics
from .errors import DtypelabError
from .formats import NumberFormat, all_formats, format_table, get_format
from .headroom import HeadroomReport, noise_floor_db, predict_headroom, variant_verdict, weight_stats
from .inputs import default_texts, model_inputs, parse_token_ids, tokenize
from .inspection import inspect_model, param_dtype_lines, print_param_dtype
from .layers import LayerComparison, compare_layers
from .models import DummyModel, LoadedModel, build_model, inspect, load
from .quantize import QuantizeResult, apply_format, quantize_model
from .safetensors_format import read_header

__all__ = [
    "DtypelabError", "DummyModel", "HeadroomReport", "KeepPolicy", "LayerComparison", "LoadedModel",
    "NextTokenMetrics", "NumberFormat", "OutputMetrics", "all_formats", "build_model", "cast_model",
    "compare_layers", "compare_models", "convert_checkpoint", "default_texts", "get_format", "inspect",
    "inspect_checkpoint", "inspect_model", "load", "model_inputs", "next_token_metrics", "noise_floor_db",
    "output_metrics", "param_dtype_lines", "parse_token_ids", "predict_headroom", "print_param_dtype",
    "read_header", "tokenize", "variant_verdict", "weight_stats",
    "QuantizeResult", "apply_format", "format_table", "quantize_model",
]
__version__ = "0.1.0"
