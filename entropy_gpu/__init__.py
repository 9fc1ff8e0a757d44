"""entropy-gpu: fused single-pass token entropy, log-probabilities and
logit-gradient norms over huge vocabularies.

Public API (reference: docs/reference/, guide: docs/usage/):
    token_stats, TokenStats, entropy, logprobs, entropy_and_logprobs,
    nll_grad_norm, entropy_grad_norm, varentropy, resolve_backend;
    correlation: Correlation, pearson, segment_pearson, PearsonState,
    spearman, segment_spearman, token_stats_with_correlation;
    exact parameter-gradient measure (small models): logit_param_grad_norms, ParamGradNorms,
    and for a whole padded batch at once: batched_logit_param_grad_norms;
    its fast forward-mode estimate: estimate_logit_param_grad_norms, ParamGradEstimate;
    training: linear_token_stats, LinearTokenStats (fused LM head),
    vocab_parallel_token_stats (logits sharded along V across torch.distributed ranks);
    entropy dynamics: entropy_change_metrics (A * entropy_change over a batch's tokens)
"""

from .backend import BACKEND_ENV, resolve_backend
from .correlation.comoments import Correlation
from .correlation.pearson import PearsonState, pearson, segment_pearson
from .correlation.spearman import segment_spearman, spearman
from .correlation.token_correlation import token_stats_with_correlation
from .dynamics import entropy_change_metrics
from .linear import LINEAR_STAT_NAMES, LinearTokenStats, linear_token_stats
from .moments import STAT_NAMES
from .param_grad.batched_exact import batched_logit_param_grad_norms
from .param_grad.estimate import ParamGradEstimate, estimate_logit_param_grad_norms
from .param_grad.exact import ParamGradNorms, logit_param_grad_norms
from .stats import (
    DEFAULT_STATS,
    TokenStats,
    entropy,
    entropy_and_logprobs,
    entropy_grad_norm,
    logprobs,
    nll_grad_norm,
    token_stats,
    varentropy,
)
from .vocab_parallel import vocab_parallel_token_stats

__version__ = "0.1.0"

__all__ = [
    "BACKEND_ENV", "DEFAULT_STATS", "STAT_NAMES", "TokenStats", "entropy", "entropy_and_logprobs",
    "entropy_grad_norm", "logprobs", "nll_grad_norm", "resolve_backend", "token_stats",
    "varentropy",
    "Correlation", "PearsonState", "pearson", "segment_pearson", "segment_spearman", "spearman",
    "token_stats_with_correlation",
    "ParamGradNorms", "logit_param_grad_norms", "batched_logit_param_grad_norms",
    "ParamGradEstimate", "estimate_logit_param_grad_norms",
    "LINEAR_STAT_NAMES", "LinearTokenStats", "linear_token_stats", "vocab_parallel_token_stats",
    "entropy_change_metrics",
]
