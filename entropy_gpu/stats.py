"""Public API: per-token statistics of softmax distributions, from one pass over the logits."""

from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple

import torch
from torch import Tensor

from ._autograd import check_inplace_logits, token_stats_op
from ._validation import CallPlan, check_logits, plan_call
from .moments import DEFAULT_STATS, DIFFERENTIABLE, STAT_NAMES

__all__ = [
    "DEFAULT_STATS", "TokenStats", "entropy", "entropy_and_logprobs", "entropy_grad_norm", "logprobs",
    "nll_grad_norm", "token_stats", "varentropy",
]


class TokenStats(NamedTuple):
    """Per-token statistics (docs/numerics.md, "One pass over a row"); a field not requested is ``None``.

    Every tensor has the leading shape of the logits and dtype float32 (float64 for
    float64 logits). Gradients are with respect to the raw logits ``z``.

    ``entropy`` and ``logprob`` are differentiable w.r.t. the logits; the other
    fields are not (they come back with ``requires_grad=False``).
    """

    logsumexp: Tensor | None = None          #: log sum_i exp(z_i / t)
    entropy: Tensor | None = None            #: H = -sum p log p (nats)
    logprob: Tensor | None = None            #: log p(target)
    sum_sq_probs: Tensor | None = None       #: sum p_i^2
    nll_grad_norm: Tensor | None = None      #: ||d(-log p_y)/dz||_2
    varentropy: Tensor | None = None         #: Var[-log p] under p
    entropy_grad_norm: Tensor | None = None  #: ||dH/dz||_2
    entropy_change: Tensor | None = None     #: grad_z H . grad_z log p_y (first-order dH along a PG step)


def token_stats(
    logits: Tensor,
    targets: Tensor | None = None,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
    stats: str | Iterable[str] | None = None,
    backend: str = "auto",
    check_targets_range: bool = True,
    inplace_backward: bool = False,
) -> TokenStats:
    """Per-token softmax statistics from a single read of ``logits`` [..., V].

    Args:
        logits: float16/bfloat16/float32/float64 tensor, any strides, any leading dims.
            ``-inf`` entries are masked vocabulary.
        targets: integer tensor of shape ``logits.shape[:-1]`` (the sampled or label
            token), needed for ``logprob``, ``nll_grad_norm`` and ``entropy_change``.
        temperature: ``t > 0``; the distribution is ``softmax(logits / t)``.
        ignore_index: rows whose target equals it get 0 in target-dependent fields.
        stats: names from ``STAT_NAMES``, ``"all"``, or None for
            ``logsumexp, entropy`` plus ``logprob, nll_grad_norm`` when targets are given.
            Only requested statistics are computed.
        backend: ``"auto"`` (Triton on GPU, torch elsewhere; env ``ENTROPY_GPU_BACKEND``
            overrides), ``"triton"`` or ``"torch"``.
        check_targets_range: check that targets lie in ``[0, V)`` or equal
            ``ignore_index`` (one host sync). With False, rows with such targets get NaN
            in the target-dependent fields; no memory outside the logits is read. Under
            ``torch.compile`` the check is skipped (no host sync): NaN rows as with False.
        inplace_backward: when ``entropy``/``logprob`` are differentiated, write the
            gradient over the logits buffer instead of a new tensor (halves the peak
            memory of the backward). The logits must be an intermediate of the graph
            (not a leaf) that nothing reads after the backward: after it, the tensor
            holds the gradient. Other autograd nodes that saved the same logits raise
            an error instead of reading it, and a second backward through this call
            raises. Ignored when no gradient is needed, and under ``torch.compile``.

    Autograd: ``entropy`` and ``logprob`` are differentiable w.r.t. ``logits`` (one
    read of the logits and one write of the gradient, both upstream gradients in one
    pass); the other fields are returned with ``requires_grad=False``. Rows whose
    statistics are NaN get NaN gradients; ignored rows get no logprob gradient.

    Returns:
        ``TokenStats``; requested fields are float32 (float64 for float64 logits) with
        shape ``logits.shape[:-1]``, each its own tensor (fine to edit in place, even
        before a backward). ``torch.autocast`` does not change them.

    NaN semantics: a row with a NaN or a ``+inf`` logit gives NaN in every field; a row
    that is all ``-inf`` gives ``logsumexp = -inf`` and NaN elsewhere.

    Example:
        >>> import torch, entropy_gpu
        >>> logits = torch.randn(4, 10, 32000)
        >>> targets = torch.randint(0, 32000, (4, 10))
        >>> out = entropy_gpu.token_stats(logits, targets)
        >>> out.entropy.shape, out.logprob.shape
        (torch.Size([4, 10]), torch.Size([4, 10]))
    """
    check_logits(logits)
    plan = plan_call(device=logits.device, lead_shape=tuple(logits.shape[:-1]), vocab=logits.shape[-1],
                     targets=targets, temperature=temperature, ignore_index=ignore_index, stats=stats,
                     backend=backend, check_targets_range=check_targets_range)
    return run_token_stats(logits, targets, plan, int(ignore_index), bool(inplace_backward))


def run_token_stats(logits: Tensor, targets: Tensor | None, plan: CallPlan, ignore_index: int,
                    inplace_backward: bool = False) -> TokenStats:
    """``token_stats`` on validated inputs, through the ``entropy_gpu::token_stats`` op; the
    backward's state is kept only when a differentiable field of logits that need a
    gradient is requested."""
    differentiable = any(w for n, w in zip(STAT_NAMES, plan.want) if n in DIFFERENTIABLE)
    save_state = differentiable and logits.requires_grad and torch.is_grad_enabled()
    # Under torch.compile the compiled graph owns its buffers: the gradient goes to a new tensor.
    inplace_backward = inplace_backward and save_state and not torch.compiler.is_compiling()
    if inplace_backward:
        check_inplace_logits(logits)
    outputs = iter(token_stats_op(logits, targets, plan.inv_temperature, ignore_index, list(plan.want),
                                  plan.backend, save_state, inplace_backward))
    return TokenStats(*(next(outputs) if w else None for w in plan.want))


def entropy(logits: Tensor, *, temperature: float = 1.0, backend: str = "auto",
            inplace_backward: bool = False) -> Tensor:
    """Softmax entropy (nats) of each row of ``logits`` [..., V]; shape ``[...]``.
    Differentiable w.r.t. ``logits`` (see ``token_stats`` for ``inplace_backward``)."""
    return token_stats(logits, temperature=temperature, stats=("entropy",), backend=backend,
                       inplace_backward=inplace_backward).entropy


def logprobs(
    logits: Tensor, targets: Tensor, *, temperature: float = 1.0, ignore_index: int = -100,
    backend: str = "auto", inplace_backward: bool = False,
) -> Tensor:
    """``log softmax(logits / t)[target]`` per row, without materializing log-probs.
    Differentiable w.r.t. ``logits`` (see ``token_stats`` for ``inplace_backward``)."""
    return token_stats(logits, targets, temperature=temperature, ignore_index=ignore_index,
                       stats=("logprob",), backend=backend, inplace_backward=inplace_backward).logprob


def entropy_and_logprobs(
    logits: Tensor, targets: Tensor, *, temperature: float = 1.0, ignore_index: int = -100,
    backend: str = "auto", inplace_backward: bool = False,
) -> tuple[Tensor, Tensor]:
    """(entropy, target log-prob) per row in one pass: the pair RL trainers need. Both are
    differentiable; their gradients are combined in one backward pass."""
    out = token_stats(logits, targets, temperature=temperature, ignore_index=ignore_index,
                      stats=("entropy", "logprob"), backend=backend, inplace_backward=inplace_backward)
    return out.entropy, out.logprob


def nll_grad_norm(
    logits: Tensor, targets: Tensor, *, temperature: float = 1.0, ignore_index: int = -100,
    backend: str = "auto",
) -> Tensor:
    """``||d(-log p_target)/d logits||_2`` per row: ``||p - onehot(target)|| / t``."""
    return token_stats(logits, targets, temperature=temperature, ignore_index=ignore_index,
                       stats=("nll_grad_norm",), backend=backend).nll_grad_norm


def entropy_grad_norm(logits: Tensor, *, temperature: float = 1.0, backend: str = "auto") -> Tensor:
    """``||dH/d logits||_2`` per row."""
    return token_stats(logits, temperature=temperature, stats=("entropy_grad_norm",),
                       backend=backend).entropy_grad_norm


def varentropy(logits: Tensor, *, temperature: float = 1.0, backend: str = "auto") -> Tensor:
    """Variance of the surprisal ``-log p`` under ``p``, per row."""
    return token_stats(logits, temperature=temperature, stats=("varentropy",), backend=backend).varentropy
