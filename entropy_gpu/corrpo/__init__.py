"""CorR-PO: a GRPO reward regularizer from the per-response correlation between token
entropy and a gradient measure. The math lives in ``reward``; trainers plug it in through
``entropy_gpu.integrations``. Definitions and defaults: docs/corrpo.md."""

from .model import CompletionStats, completion_stats, corrpo_from_model, micro_batch_token_stats
from .reward import (
    GRADIENT_MEASURES,
    LOGITS_DEFAULT_CONFIG,
    PARAM_GRAD_MEASURE,
    PARAM_GRAD_METHODS,
    PHI_NAMES,
    CorrPOConfig,
    CorrPOOutput,
    ParamGradMeasure,
    check_group_size,
    completion_correlations,
    corrpo_from_logits,
    corrpo_from_stats,
    corrpo_metrics,
    corrpo_term,
    group_advantages,
    group_pooled_correlations,
)

__all__ = [
    "CorrPOConfig", "CorrPOOutput", "GRADIENT_MEASURES", "LOGITS_DEFAULT_CONFIG", "PARAM_GRAD_MEASURE",
    "PARAM_GRAD_METHODS", "PHI_NAMES",
    "ParamGradMeasure", "CompletionStats", "completion_stats", "corrpo_from_model", "completion_correlations",
    "check_group_size", "corrpo_from_logits", "corrpo_from_stats", "corrpo_metrics", "corrpo_term",
    "group_advantages", "group_pooled_correlations", "micro_batch_token_stats",
]
