"""entropy-gpu: fused single-pass token entropy, log-probabilities and
logit-gradient norms over huge vocabularies.

Public API (see README.md):
    token_stats, TokenStats, entropy, logprobs, entropy_and_logprobs,
    nll_grad_norm, entropy_grad_norm, varentropy, resolve_backend,
    linear_token_stats, LinearTokenStats (fused LM head),
    vocab_parallel_token_stats (logits sharded along V across torch.distributed ranks)
"""

from .backend import BACKEND_ENV, resolve_backend
from .linear import LINEAR_STAT_NAMES, LinearTokenStats, linear_token_stats
from .moments import STAT_NAMES
from .vocab_parallel import vocab_parallel_token_stats
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

__version__ = "0.1.0"

__all__ = [
    "BACKEND_ENV", "DEFAULT_STATS", "STAT_NAMES", "TokenStats", "entropy", "entropy_and_logprobs",
    "entropy_grad_norm", "logprobs", "nll_grad_norm", "resolve_backend", "token_stats",
    "varentropy",
    "LINEAR_STAT_NAMES", "LinearTokenStats", "linear_token_stats", "vocab_parallel_token_stats",
]
