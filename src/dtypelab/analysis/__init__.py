"""Analysis: running models, the metrics, compare, layer-wise comparison, verdicts, headroom, weights.

Analysis stage, above :mod:`dtypelab.variants`: everything that measures a reference against its variants.
"""

from .compare import (
    OUTPUT_BATCH_BYTES,
    CompareSetup,
    ComparisonResult,
    VariantResult,
    VariantTask,
    compare_models,
    compare_on,
)
from .headroom import HeadroomReport, LayerHeadroom, RangeCounts, keep_list, predict_headroom
from .layers import DEFAULT_THRESHOLD_DB, MODES, LayerComparison, LayerRow, VariantLayers, compare_layers
from .metrics import (
    ErrorSums,
    NextTokenMetrics,
    NextTokenSums,
    OutputMetrics,
    cosine_similarity,
    kl_divergence,
    max_abs_diff,
    mean_abs_diff,
    mean_pooled,
    measure,
    next_token_metrics,
    output_metrics,
    pooled_cosines,
    relative_error,
    sqnr_db,
    top1_agreement,
    valid_positions,
)
from .planner import (
    Budget,
    Choice,
    PlanResult,
    PlanRow,
    PlanSweep,
    measure_plan,
    measure_plans,
    parse_budget,
    parse_budgets,
    plan_model,
    solve,
    uniform_plans,
)
from .run import (
    batch_rows,
    input_dtype,
    is_logits_output,
    named_output,
    own_inputs,
    run_model,
    select_layers,
    select_output,
    split_rows,
)
from .sensitivity import (
    FUSED_LAYERS,
    SENSITIVITY_METHODS,
    GroupScore,
    LayerGroup,
    SensitivityResult,
    layer_groups,
    sensitivity,
    spearman_rho,
)
from .timing import forward_latency_ms, paired_latency_ms
from .verdict import NOISE_MARGIN_DB, noise_floor_db, rounding_floor_db, variant_verdict
from .weights import WeightReport, WeightStats, weight_stats

__all__ = [
    "DEFAULT_THRESHOLD_DB", "MODES", "OUTPUT_BATCH_BYTES", "NextTokenSums", "batch_rows",
    "split_rows", "FUSED_LAYERS", "GroupScore", "LayerGroup", "SensitivityResult", "layer_groups",
    "sensitivity", "spearman_rho", "SENSITIVITY_METHODS", "Budget", "Choice", "PlanResult", "PlanRow",
    "parse_budget",
    "parse_budgets", "plan_model", "solve", "measure_plan", "measure_plans", "PlanSweep", "uniform_plans",
    "NOISE_MARGIN_DB", "ComparisonResult", "ErrorSums", "HeadroomReport",
    "LayerComparison", "LayerHeadroom", "LayerRow", "NextTokenMetrics", "OutputMetrics", "RangeCounts",
    "VariantLayers", "VariantResult", "VariantTask", "CompareSetup", "compare_on",
    "WeightReport", "WeightStats", "compare_layers", "compare_models",
    "cosine_similarity", "forward_latency_ms", "input_dtype", "is_logits_output", "keep_list",
    "kl_divergence", "max_abs_diff", "mean_abs_diff", "mean_pooled", "measure", "named_output",
    "next_token_metrics", "noise_floor_db", "output_metrics", "own_inputs", "paired_latency_ms",
    "pooled_cosines", "predict_headroom", "relative_error", "rounding_floor_db", "run_model",
    "select_layers", "select_output", "sqnr_db", "top1_agreement", "valid_positions", "variant_verdict",
    "weight_stats",
]
