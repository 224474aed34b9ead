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

from .quiet import drop_known_noise

drop_known_noise()  # before any submodule can import transformers or a peer

from .analysis import (  # noqa: E402
    ComparisonResult,
    HeadroomReport,
    LayerComparison,
    NextTokenMetrics,
    OutputMetrics,
    WeightReport,
    compare_layers,
    compare_models,
    next_token_metrics,
    noise_floor_db,
    output_metrics,
    predict_headroom,
    rounding_floor_db,
    variant_verdict,
    weight_stats,
)
from .checkpoint import (  # noqa: E402
    CheckpointInspection,
    ConversionResult,
    convert_checkpoint,
    inspect_checkpoint,
    read_header,
)
from .errors import Cancelled, DtypelabError  # noqa: E402
from .formats import Granularity, NumberFormat, all_formats, format_table, get_format  # noqa: E402
from .models import (  # noqa: E402
    DummyModel,
    LoadedModel,
    ModelKind,
    OutputKind,
    build_model,
    default_texts,
    inspect,
    load,
    model_inputs,
    parse_token_ids,
    tokenize,
)
from .progress import ProgressCallback, ProgressEvent  # noqa: E402
from .quant import (  # noqa: E402
    KeepPolicy,
    ModelInspection,
    QuantizeResult,
    TensorDamage,
    cast_model,
    inspect_model,
    param_dtype_lines,
    print_param_dtype,
    quantize_model,
    round_trip,
)
from .variants import Variant, apply_format, build_variants, parse_variant_specs  # noqa: E402

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
