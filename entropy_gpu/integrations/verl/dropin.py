"""Drop-ins for verl's entropy, log-prob and sum-of-squared-probability functions, served by
entropy_gpu: one read of the logits per call, fp32 outputs, log-probs never above 0.

While CorR-PO's capture is active (``capture_measure``, entered by ``corrpo.py`` around the
actor's old-log-prob pass), the log-prob drop-ins also return the gradient measure and
``entropy_change`` from the same read of the logits. ``patching.py`` puts these in verl's place.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator

import torch
from torch import Tensor

from entropy_gpu import STAT_NAMES, linear_token_stats, token_stats, vocab_parallel_token_stats


def _nonpositive(logprob: Tensor) -> Tensor:
    """``min(logprob, 0)`` in value; the gradient passes unchanged (a rounding of +1e-7
    on a token with p ~ 1 must not cut its gradient)."""
    return logprob - logprob.detach().clamp(min=0.0)


# --------------------------------------------------------------------------- the measure capture


class _Capture:
    def __init__(self, name: str) -> None:
        self.name = name
        self.values: list[Tensor] = []
        self.entropy_change: list[Tensor] = []  # of the logits as verl passes them (already / t)

    def stats(self) -> tuple[str, ...]:
        return ("logprob", self.name, "entropy_change")

    def keep(self, out) -> None:
        self.values.append(getattr(out, self.name))
        self.entropy_change.append(out.entropy_change)


_CAPTURE: contextvars.ContextVar[_Capture | None] = contextvars.ContextVar(
    "entropy_gpu_verl_capture", default=None
)


@contextlib.contextmanager
def capture_measure(name: str) -> Iterator[_Capture]:
    """While active, the patched log-prob functions also return the gradient measure ``name``
    and ``entropy_change`` from the same read of the logits (appended to the yielded object's
    ``values`` and ``entropy_change``)."""
    if name not in STAT_NAMES:
        raise ValueError(f"measure {name!r} is not a per-token logit statistic ({STAT_NAMES})")
    token = _CAPTURE.set(_Capture(name))
    try:
        yield _CAPTURE.get()
    finally:
        _CAPTURE.reset(token)


# ------------------------------------------------------------------ verl.utils.torch_functional


@torch.compiler.disable  # one fused pass already; verl wraps entropy in torch.compile
def entropy_from_logits(logits: Tensor) -> Tensor:
    """Drop-in for ``verl.utils.torch_functional.entropy_from_logits``: ``H(softmax(logits))``
    per row, float32 (float64 for float64 logits), differentiable."""
    return token_stats(logits, stats="entropy").entropy


def entropy_from_logits_with_chunking(logits: Tensor, chunk_size: int = 2048) -> Tensor:
    """Drop-in for verl's chunked variant. entropy_gpu already streams over the vocabulary, so
    ``chunk_size`` (verl's row chunk) is accepted and not needed."""
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be an int >= 1, got {chunk_size!r}")
    return entropy_from_logits(logits)


@torch.compiler.disable
def logprobs_from_logits(logits: Tensor, labels: Tensor, inplace_backward: bool = True) -> Tensor:
    """Drop-in for ``verl.utils.torch_functional.logprobs_from_logits``: ``log softmax(logits)[labels]``,
    float32, never above 0, differentiable.

    ``inplace_backward`` (verl passes True when nothing else reads the logits) writes the
    gradient over the logits buffer; it is used only for non-leaf logits. While CorR-PO's
    capture is active (the old-log-prob pass), the same read also yields the gradient measure.
    """
    measure = _CAPTURE.get()
    want = ("logprob",) if measure is None else measure.stats()
    inplace = bool(inplace_backward) and logits.requires_grad and logits.grad_fn is not None
    out = token_stats(logits, labels, stats=want, inplace_backward=inplace)
    if measure is not None:
        measure.keep(out)
    return _nonpositive(out.logprob)


@torch.compiler.disable
def calculate_sum_pi_squared_from_logits(logits: Tensor) -> Tensor:
    """Drop-in for verl's ``calculate_sum_pi_squared_from_logits``: ``sum_i p_i^2`` per row, float32."""
    return token_stats(logits, stats="sum_sq_probs").sum_sq_probs


# ------------------------------------------------------------ verl.utils.megatron.tensor_parallel


def _tp_group(group):
    if group is not None:
        return group
    from megatron.core import parallel_state as mpu  # verl's Megatron path: the tensor-parallel group

    return mpu.get_tensor_model_parallel_group()


def vocab_parallel_entropy(vocab_parallel_logits: Tensor, *, group=None) -> Tensor:
    """Drop-in for ``verl.utils.megatron.tensor_parallel.vocab_parallel_entropy``: the entropy of
    the full rows from this rank's vocabulary shard (equal shards in rank order, as Megatron
    splits them); ``group`` defaults to Megatron's tensor-parallel group. Differentiable."""
    return vocab_parallel_token_stats(vocab_parallel_logits, group=_tp_group(group), stats="entropy").entropy


def vocab_parallel_entropy_with_chunking(
    vocab_parallel_logits: Tensor, chunk_size: int = 2048, *, group=None
) -> Tensor:
    """Drop-in for verl's chunked variant; ``chunk_size`` is accepted and not needed."""
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be an int >= 1, got {chunk_size!r}")
    return vocab_parallel_entropy(vocab_parallel_logits, group=group)


def vocab_parallel_log_probs_from_logits(logits: Tensor, labels: Tensor, *, group=None) -> Tensor:
    """Drop-in for verl's ``vocab_parallel_log_probs_from_logits`` (global label ids),
    float32, never above 0, differentiable."""
    measure = _CAPTURE.get()
    want = ("logprob",) if measure is None else measure.stats()
    out = vocab_parallel_token_stats(logits, labels, group=_tp_group(group), stats=want)
    if measure is not None:
        measure.keep(out)
    return _nonpositive(out.logprob)


def vocab_parallel_sum_pi_squared(vocab_parallel_logits: Tensor, *, group=None) -> Tensor:
    """Drop-in for verl's ``vocab_parallel_sum_pi_squared``, float32."""
    return vocab_parallel_token_stats(
        vocab_parallel_logits, group=_tp_group(group), stats="sum_sq_probs"
    ).sum_sq_probs


# --------------------------------------------------------------------------- fused LM head


def fused_linear_for_ppo_forward(original: Callable) -> Callable:
    """A replacement for ``FusedLinearForPPO.forward`` (``original``, kept as ``__wrapped__``)."""

    def forward(
        self, hidden_states: Tensor, vocab_weights: Tensor, input_ids: Tensor, temperature: float = 1.0
    ) -> tuple[Tensor, Tensor]:
        """``FusedLinearForPPO.forward`` from ``linear_token_stats``: (log-probs, entropy) of
        ``softmax(hidden @ W.T / temperature)``, both float32; the logits are never materialized."""
        out = linear_token_stats(
            hidden_states,
            vocab_weights,
            input_ids.to(torch.int64),
            temperature=float(temperature),
            stats=("logprob", "entropy"),
        )
        return _nonpositive(out.logprob), out.entropy

    forward.__wrapped__ = original
    return forward


def linear_cross_entropy_dropin(original: Callable) -> Callable:
    """A replacement for verl's ``linear_cross_entropy`` (``original``, kept as ``__wrapped__``,
    still serves what the drop-in does not)."""

    def linear_cross_entropy(
        hidden, weight, labels, temperature=1.0, reduction="none", dist_process_group=None
    ):
        """verl's ``linear_cross_entropy`` (fused LM head) from ``linear_token_stats``: float32
        (log-probs, entropy) flattened to ``[tokens]`` as verl's kernel returns them.
        Vocabulary-sharded weights (``dist_process_group``) and reduced outputs stay on verl's kernel."""
        if dist_process_group is not None or reduction != "none":
            return original(hidden, weight, labels, temperature, reduction, dist_process_group)
        out = linear_token_stats(
            hidden.reshape(-1, hidden.shape[-1]),
            weight,
            labels.reshape(-1).to(torch.int64),
            temperature=float(temperature),
            stats=("logprob", "entropy"),
        )
        return _nonpositive(out.logprob), out.entropy

    linear_cross_entropy.__wrapped__ = original
    return linear_cross_entropy
