"""dtypelab: what happens to my model in precision X?

Example:
    >>> import dtypelab
    >>> model = dtypelab.DummyModel()
    >>> result = dtypelab.compare_models(model, {"bf16": dtypelab.cast_model(model, "bf16")},
    ...                                  dtypelab.parse_token_ids("[[1, 0, 1]]"))
"""

from .cast import KeepPolicy, cast_model
from .compare import OutputMetrics, compare_models, output_metrics
from .errors import DtypelabError
from .formats import NumberFormat, all_formats, get_format
from .headroom import HeadroomReport, noise_floor_db, predict_headroom, variant_verdict, weight_stats
from .inputs import parse_token_ids
from .inspection import inspect_model, param_dtype_lines, print_param_dtype
from .layers import LayerComparison, compare_layers
from .models import DummyModel, build_model

__all__ = [
    "DtypelabError", "DummyModel", "HeadroomReport", "KeepPolicy", "LayerComparison", "NumberFormat",
    "OutputMetrics", "all_formats", "build_model", "cast_model", "compare_layers", "compare_models",
    "get_format", "inspect_model", "noise_floor_db", "output_metrics", "param_dtype_lines",
    "parse_token_ids", "predict_headroom", "print_param_dtype", "variant_verdict", "weight_stats",
]
__version__ = "0.1.0"
