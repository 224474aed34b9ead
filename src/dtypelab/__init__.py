"""dtypelab: what happens to my model in precision X?

Example:
    >>> import dtypelab
    >>> model = dtypelab.DummyModel()
    >>> result = dtypelab.compare_models(model, {"bf16": dtypelab.cast_model(model, "bf16")},
    ...                                  dtypelab.parse_token_ids("[[1, 0, 1]]"))
"""

from .cast import KeepPolicy, cast_model
from .checkpoint import convert_checkpoint, inspect_checkpoint
from .compare import OutputMetrics, compare_models, output_metrics
from .errors import DtypelabError
from .formats import NumberFormat, all_formats, get_format
from .inputs import parse_token_ids
from .inspection import inspect_model, param_dtype_lines, print_param_dtype
from .models import DummyModel, build_model
from .safetensors_format import read_header

__all__ = [
    "DtypelabError", "DummyModel", "KeepPolicy", "NumberFormat", "OutputMetrics", "all_formats",
    "build_model", "cast_model", "compare_models", "convert_checkpoint", "get_format", "inspect_checkpoint",
    "inspect_model", "output_metrics", "param_dtype_lines", "parse_token_ids", "print_param_dtype",
    "read_header",
]
__version__ = "0.1.0"
