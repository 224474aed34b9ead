"""Analysis: running models, the metrics, compare, layer-wise comparison, verdicts, headroom, weights.

Analysis stage, above :mod:`dtypelab.variants`: everything that measures a reference against its variants.
"""

from ..lazy import lazy_exports

_EXPORTS = {  # public name -> the submodule that defines it (imported on first use)
    "OUTPUT_BATCH_BYTES": "compare", "CompareSetup": "compare", "ComparisonResult": "compare",
    "VariantResult": "compare", "VariantTask": "compare", "compare_models": "compare",
    "compare_on": "compare",
    "HeadroomReport": "headroom", "LayerHeadroom": "headroom", "RangeCounts": "headroom",
    "keep_list": "headroom", "predict_headroom": "headroom",
    "DEFAULT_THRESHOLD_DB": "defaults", "MODES": "defaults", "COMPUTES": "defaults",
    "LayerComparison": "layers", "LayerRow": "layers", "VariantLayers": "layers", "compare_layers": "layers",
    "ErrorSums": "metrics", "NextTokenMetrics": "metrics", "NextTokenSums": "metrics",
    "OutputMetrics": "metrics", "cosine_similarity": "metrics", "kl_divergence": "metrics",
    "max_abs_diff": "metrics", "mean_abs_diff": "metrics", "mean_pooled": "metrics", "measure": "metrics",
    "next_token_metrics": "metrics", "output_metrics": "metrics", "pooled_cosines": "metrics",
    "relative_error": "metrics", "sqnr_db": "metrics", "top1_agreement": "metrics",
    "valid_positions": "metrics",
    "Budget": "planner", "Choice": "planner", "PlanResult": "planner", "PlanRow": "planner",
    "PlanSweep": "planner", "measure_plan": "planner", "measure_plans": "planner", "parse_budget": "planner",
    "parse_budgets": "planner", "plan_model": "planner", "solve": "planner", "uniform_plans": "planner",
    "batch_rows": "run", "input_dtype": "run", "is_logits_output": "run", "named_output": "run",
    "own_inputs": "run", "run_model": "run", "select_layers": "run", "select_output": "run",
    "split_rows": "run",
    "FUSED_LAYERS": "sensitivity_sweep", "SENSITIVITY_METHODS": "defaults",
    "GroupScore": "sensitivity_sweep", "LayerGroup": "sensitivity_sweep",
    "SensitivityResult": "sensitivity_sweep", "layer_groups": "sensitivity_sweep",
    "sensitivity": "sensitivity_sweep", "spearman_rho": "sensitivity_sweep",
    "forward_latency_ms": "timing", "paired_latency_ms": "timing",
    "NOISE_MARGIN_DB": "verdict", "noise_floor_db": "verdict", "rounding_floor_db": "verdict",
    "variant_verdict": "verdict",
    "WeightReport": "weights", "WeightStats": "weights", "weight_stats": "weights",
}

__all__ = [
    "DEFAULT_THRESHOLD_DB", "MODES", "COMPUTES", "OUTPUT_BATCH_BYTES", "NextTokenSums", "batch_rows",
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

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
