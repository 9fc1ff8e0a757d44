"""SIA analysis: conditional answer entropy along the prefixes of reasoning traces.

``answer_curve`` computes ``H_k`` and ``log p(true answer)_k`` for one trace,
``analyze_traces`` for many (progress bar), ``summarize`` the dataset view (mean
curves, AUROC of signatures for correctness). Definitions: SPEC section 5 and the
docs/usage/sia.md. Every vocabulary-wide quantity goes through
``entropy_gpu.token_stats``.
"""

from .answers import (
    ANSWER_KINDS,
    answers_match,
    extract_answer,
    extract_boxed,
    extract_letter,
    extract_number,
    normalize_math,
    normalize_number,
    normalize_short_answer,
)
from .curve import (
    ESTIMATORS,
    METHODS,
    AnswerCurve,
    SIAConfig,
    analyze_traces,
    answer_curve,
    miller_madow_entropy,
    prompt_ids,
)
from .data import (
    DATASETS,
    Problem,
    Trace,
    gold_traces,
    gsm8k_gold_trace,
    iter_dataset,
    iter_jsonl,
    load_arc,
    load_dataset,
    load_gsm8k,
    load_jsonl,
    load_math500,
)
from .generate import ENGINES, generate_traces, generate_traces_vllm, trace_from_tokens, vllm_sampling_kwargs
from .segment import SEGMENTATIONS, Segmentation, Step, segment_trace
from .signatures import SIGNATURES, auroc, auroc_with_interval, fano_bound, summarize, trace_signatures

__all__ = [
    "ANSWER_KINDS", "DATASETS", "ENGINES", "ESTIMATORS", "METHODS", "SEGMENTATIONS", "SIGNATURES",
    "AnswerCurve", "Problem", "SIAConfig", "Segmentation", "Step", "Trace", "analyze_traces", "answer_curve",
    "answers_match",
    "auroc", "auroc_with_interval", "extract_answer", "extract_boxed", "extract_letter", "extract_number",
    "fano_bound", "generate_traces", "generate_traces_vllm", "gold_traces", "gsm8k_gold_trace",
    "iter_dataset", "iter_jsonl", "load_arc", "load_dataset",
    "load_gsm8k", "load_jsonl", "load_math500", "miller_madow_entropy", "normalize_math", "normalize_number",
    "normalize_short_answer", "prompt_ids", "segment_trace", "summarize", "trace_from_tokens",
    "trace_signatures", "vllm_sampling_kwargs",
]
