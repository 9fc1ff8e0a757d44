"""Fast estimates of the per-token parameter-gradient norm of the sampled token's raw logit
(the measure of :mod:`entropy_gpu.param_grad.exact`), for every token of a batch at once.

**Forward-mode estimator** (:func:`estimate_logit_param_grad_norms`). For a random
direction ``v`` in parameter space with independent zero-mean, unit-variance entries,
``E[(v . g_t)^2] = ||g_t||_F^2`` where ``g_t = d z_{t-1}[y_t] / d theta``. One forward-mode
pass (a JVP) gives ``v . g_t`` for every token ``t`` of the batch together, so ``k``
directions give an unbiased estimate of every token's squared Frobenius norm for ``k``
forward-mode passes, not one backward pass per token. Directions are batched: the batch is
repeated ``directions_per_pass`` times and a forward hook on each selected ``nn.Linear``
adds ``x V_d^T (+ b_d)`` to the output's tangent for the copy that carries direction ``d``,
so the random matrices are never stored for more than one layer at a time. Other selected
parameters (norm weights, embeddings, ...) get dual tensors directly, one direction per pass.

Variance (per token, ``k`` directions): Rademacher entries give
``Var = 2 (||g||^4 - sum_i g_i^4) / k`` (relative standard deviation about ``sqrt(2/k)``),
Gaussian ones ``2 ||g||^4 / k``. Antithetic pairs do not help: ``(-v . g)^2 = (v . g)^2``.
Orthogonalizing ``k`` directions in a space of millions of dimensions changes the variance
by a factor ``~(1 - k/n)``, nothing. Splitting directions by layer (``split_layers``) gives
per-layer estimates that add up to the total; for the total at equal cost it never lowers
the variance (``L * sum_l ||g_l||^4 >= (sum_l ||g_l||^2)^2``), so it is off by default.

**Same-position candidate** (:func:`same_position_grad_norms`): exact gradients of every
token's logit with the cross-position paths dropped (in attention, keys and values of other
positions are constants). Then the gradient of ``z_{t-1}[y_t]`` lives at position ``t-1``
only, every ``nn.Linear`` weight gradient is the rank-1 ``g x^T`` and one backward serves all
tokens. An approximation: it is not an estimate of the exact measure. Its attention runs
on SDPA (the model's own attention kernels, whatever ``attn_implementation`` it was loaded
with, are not used for this pass); soft-capped attention (Gemma-2) runs an eager version.

Forward-mode AD and attention: ``eager`` attention supports it; ``sdpa`` does through its
math backend only (PyTorch's fused SDPA kernels, the CPU flash kernel and CUDA's flash and
memory-efficient ones, have no forward-mode formula), so the passes run SDPA on the math
backend; FlashAttention, flex attention and other kernels do not, so the estimator switches
such a model to ``eager`` attention for its passes, with a warning, and restores it.
"""

from __future__ import annotations

import contextlib
import contextvars
import time
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor, nn

from .model_parts import (
    DEFAULT_PARAM_PATTERNS,
    NORMS,
    causal_lm,
    check_logits_match,
    combine_by_layer,
    layer_name,
    only_requires_grad,
    output_logit_fn,
    plain_linear_params,
    refuse_sharded,
    select_parameters,
)

DISTRIBUTIONS = ("rademacher", "gaussian")
#: Attention implementations whose kernels have forward-mode derivatives.
FORWARD_AD_ATTENTION = ("eager", "sdpa")
_SAME_POSITION_ATTENTION = "entropy_gpu_same_position"


@dataclass
class ParamGradEstimate:
    """Estimates of ``||d z_{t-1}[y_t] / d theta||_F^2`` for the scored tokens of a batch.

    Per-token tensors are ``[B, T]``, aligned with ``input_ids`` (the value at ``t`` is for
    token ``y_t``); 0 where ``mask`` is False.
    """

    mask: Tensor            #: [B, T] bool, the scored tokens
    logits: Tensor          #: [B, T] raw logit z_{t-1}[y_t] (the primal of the passes)
    directional: Tensor     #: [G, k, B, T] v . g_t per direction (G = 1, or layers when split)
    layer_names: tuple[str, ...]   #: the layers of the groups when split, else all layers
    split_layers: bool
    seconds: list[float]    #: wall time of each pass (directions_per_pass directions each)

    @property
    def k(self) -> int:
        return self.directional.shape[1]

    def sq_fro(self, k: int | None = None) -> Tensor:
        """[B, T] estimate of the squared Frobenius norm from the first ``k`` directions (all by default)."""
        return self.per_group_sq(k).sum(-1)

    def fro(self, k: int | None = None) -> Tensor:
        """[B, T] estimate of the Frobenius norm: the square root of :meth:`sq_fro`."""
        return self.sq_fro(k).sqrt()

    def per_group_sq(self, k: int | None = None) -> Tensor:
        """[B, T, G] squared-Frobenius estimate per direction group (per layer when split;
        they add up to :meth:`sq_fro`)."""
        k = self.k if k is None else k
        if not 1 <= k <= self.k:
            raise ValueError(f"k must be between 1 and {self.k}, got {k}")
        return self.directional[:, :k].square().mean(1).permute(1, 2, 0)

    def per_layer_sq(self, k: int | None = None) -> Tensor:
        """[B, T, layers] per-layer squared-Frobenius estimates (needs ``split_layers=True``)."""
        if not self.split_layers:
            raise ValueError("per-layer estimates need split_layers=True: one direction over all layers "
                             "cannot tell the layers apart")
        return self.per_group_sq(k)


def _check_int(name: str, value: object, low: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    return value


def check_batch(input_ids: object, response_mask: object, attention_mask: object
                ) -> tuple[Tensor, Tensor, Tensor]:
    """Validate a padded batch: ``input_ids`` [B, T] (or [T]) int, ``response_mask`` and
    ``attention_mask`` of the same shape (1 = scored token / real token). Returns them as
    (int64, bool, int64), each 2-D."""
    if not isinstance(input_ids, Tensor):
        raise TypeError(f"input_ids must be a torch.Tensor, got {type(input_ids).__name__}")
    if input_ids.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"input_ids must be int64 or int32 token ids, got {input_ids.dtype}")
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [B, T] or [T], got shape {tuple(input_ids.shape)}")
    masks = []
    for name, m in (("response_mask", response_mask), ("attention_mask", attention_mask)):
        if m is None:
            m = torch.ones_like(input_ids)
        if not isinstance(m, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(m).__name__}")
        if m.dim() == 1:
            m = m[None]
        if m.shape != input_ids.shape:
            raise ValueError(f"{name} shape {tuple(m.shape)} differs from input_ids {tuple(input_ids.shape)}")
        masks.append(m.to(input_ids.device))
    response, attention = masks[0].bool(), masks[1].long()
    if not response.any():
        raise ValueError("empty response: response_mask selects no token")
    if response[:, 0].any():
        raise ValueError("response_mask marks position 0: a scored token needs a preceding position")
    if (response & (attention == 0)).any():
        raise ValueError("response_mask marks tokens outside attention_mask (padding)")
    return input_ids.long(), response, attention


def _direction(shape: torch.Size, seed: int, param_index: int, direction: int, distribution: str,
               dtype: torch.dtype, device: torch.device) -> Tensor:
    """Direction ``direction`` for parameter ``param_index``: the same numbers whatever the
    batching of directions into passes."""
    gen = torch.Generator(device=device)
    gen.manual_seed((seed * 1_000_003 + param_index) * 8_191 + direction)
    if distribution == "gaussian":
        return torch.randn(shape, generator=gen, device=device, dtype=dtype)
    v = torch.randint(0, 2, shape, generator=gen, device=device, dtype=torch.int8)
    return v.to(dtype).mul_(2).sub_(1)


@contextlib.contextmanager
def forward_ad_attention(model: nn.Module) -> Iterator[None]:
    """Run the model with attention that has forward-mode derivatives. ``eager`` stays;
    ``sdpa`` stays but with its math backend (PyTorch's fused SDPA kernels, CPU flash and
    CUDA flash / memory-efficient, have no forward-mode formula); anything else
    (FlashAttention, flex, ...) switches to ``eager`` with a warning. Restored on exit."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    config = getattr(model, "config", None)
    impl = getattr(config, "_attn_implementation", None)
    switch = impl is not None and impl not in FORWARD_AD_ATTENTION
    if switch:
        warnings.warn(f"forward-mode AD does not support attn_implementation={impl!r}; the gradient-norm "
                      "estimate runs with eager attention (same results, more memory)", stacklevel=3)
        config._attn_implementation = "eager"
    try:
        with sdpa_kernel([SDPBackend.MATH]):
            yield
    finally:
        if switch:
            config._attn_implementation = impl


class _LinearTangents:
    """Forward hooks that add ``x V_d^T + b_d`` to the tangents of the selected Linear outputs,
    for the directions of the current pass (the batch holds one copy per direction)."""

    def __init__(self, model: nn.Module, linear: dict[str, tuple[str, str]], index: dict[str, int],
                 seed: int, distribution: str):
        self.seed, self.distribution = seed, distribution
        by_module: dict[str, dict[str, str]] = {}
        for name, (module_name, attr) in linear.items():
            by_module.setdefault(module_name, {})[attr] = name
        self.modules = {m: (model.get_submodule(m), attrs) for m, attrs in by_module.items()}
        self.index = index
        self.active: set[str] = set()
        self.directions: range = range(0)

    @contextlib.contextmanager
    def hooked(self) -> Iterator[None]:
        handles = [module.register_forward_hook(self._hook(attrs)) for module, attrs in self.modules.values()]
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def _stack(self, name: str, shape: torch.Size, like: Tensor) -> Tensor:
        return torch.stack([_direction(shape, self.seed, self.index[name], d, self.distribution, like.dtype,
                                       like.device) for d in self.directions])

    def _hook(self, attrs: dict[str, str]):
        def hook(module: nn.Linear, args: tuple, output: Tensor) -> Tensor | None:
            names = {a: n for a, n in attrs.items() if n in self.active}
            if not names:
                return None
            n = len(self.directions)
            x = fwAD.unpack_dual(args[0]).primal
            primal, tangent = fwAD.unpack_dual(output)
            extra = primal.new_zeros((n, primal.numel() // (n * module.out_features), module.out_features))
            if "weight" in names:
                v = self._stack(names["weight"], module.weight.shape, primal)  # [n, out, in]
                extra = torch.baddbmm(extra, x.reshape(n, -1, module.in_features), v.transpose(1, 2))
            if "bias" in names:
                extra = extra + self._stack(names["bias"], module.bias.shape, primal)[:, None, :]
            extra = extra.reshape(primal.shape)
            return fwAD.make_dual(primal, extra if tangent is None else tangent + extra)
        return hook


def estimate_logit_param_grad_norms(
    model: nn.Module,
    input_ids: Tensor,
    response_mask: Tensor,
    *,
    attention_mask: Tensor | None = None,
    k: int = 16,
    param_patterns: str | Iterable[str] = DEFAULT_PARAM_PATTERNS,
    split_layers: bool = False,
    distribution: str = "rademacher",
    seed: int = 0,
    directions_per_pass: int = 8,
    check_logits: bool = True,
) -> ParamGradEstimate:
    """Unbiased estimates of every scored token's squared parameter-gradient Frobenius norm
    ``||d z_{t-1}[y_t] / d theta||_F^2`` from ``k`` forward-mode passes (JVPs).

    Args:
        model: a Hugging Face causal LM whose logits are ``h . W[y]`` (+ bias, soft-capping)
            of ``model.base_model``'s last hidden state.
        input_ids: ``[B, T]`` (or ``[T]``) prompt + response, padded.
        response_mask: ``[B, T]``, 1 at the tokens ``y_t`` to score (never position 0).
        attention_mask: ``[B, T]``, 1 for real tokens (left or right padding); default all ones.
        k: random directions per group (``>= 1``); the relative standard deviation of a
            token's squared-norm estimate is about ``sqrt(2 / k)``.
        param_patterns: fnmatch patterns over parameter names, as for
            :func:`~entropy_gpu.param_grad.exact.logit_param_grad_norms`.
        split_layers: one group of ``k`` directions per layer (per-layer estimates, ``layers``
            times the cost) instead of ``k`` directions over all selected parameters.
        distribution: ``"rademacher"`` (default, lower variance) or ``"gaussian"``.
        seed: directions are a function of ``(seed, parameter, direction index)``: the same
            seed gives the same estimate whatever ``directions_per_pass`` and device batching.
        directions_per_pass: directions batched into one forward pass (memory: the batch is
            repeated this many times). Selected parameters that are not ``nn.Linear`` weights
            or biases force one direction per pass.
        check_logits: compare the differentiated logit with the model's own logits (one
            extra no-grad forward); callers that already hold the logits check them with
            :func:`check_logits_match` instead.

    Returns:
        :class:`ParamGradEstimate`; ``.fro()`` / ``.sq_fro()`` give the per-token estimates.

    Raises:
        TypeError / ValueError: bad arguments, a pattern matching no parameter, an empty
            response, or a model whose logits are not ``h . W[y]``.
    """
    ids, response, attention = check_batch(input_ids, response_mask, attention_mask)
    k = _check_int("k", k)
    directions_per_pass = _check_int("directions_per_pass", directions_per_pass)
    if distribution not in DISTRIBUTIONS:
        raise ValueError(f"distribution must be one of {DISTRIBUTIONS}, got {distribution!r}")
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    model = causal_lm(model)
    selected = select_parameters(model, param_patterns)
    refuse_sharded(model, selected)
    head_weight, logit_of = output_logit_fn(model)
    linear = plain_linear_params(model, selected, head_weight)
    generic = [name for name in selected if name not in linear]
    if generic:
        directions_per_pass = 1
    layers = tuple(dict.fromkeys(layer_name(n) for n in selected))
    groups = ([[n for n in selected if layer_name(n) == layer] for layer in layers] if split_layers
              else [list(selected)])
    batch_idx, pos = response.nonzero(as_tuple=True)
    passes = _ForwardModePasses(model, selected, linear, generic, seed, distribution, logit_of)
    B, T = ids.shape
    directional = None
    logits = None
    seconds = []
    with torch.no_grad(), forward_ad_attention(model), fwAD.dual_level(), passes.tangents.hooked():
        for g, group in enumerate(groups):
            for d0 in range(0, k, directions_per_pass):
                started = time.perf_counter()
                d1 = min(k, d0 + directions_per_pass)
                primal, tangent = passes.run(ids, attention, batch_idx, pos, group, range(d0, d1))
                if directional is None:
                    directional = tangent.new_zeros((len(groups), k, B, T))
                    logits = primal.new_zeros((B, T))
                    logits[batch_idx, pos] = primal[0]
                directional[g, d0:d1, batch_idx, pos] = tangent
                seconds.append(time.perf_counter() - started)
    if check_logits:
        check_logits_match(model, logits[batch_idx, pos], model_token_logits(model, ids, attention, response))
    return ParamGradEstimate(mask=response, logits=logits, directional=directional,
                             layer_names=layers, split_layers=split_layers, seconds=seconds)


class _ForwardModePasses:
    """One forward-mode pass per call: the batch repeated once per direction, Linear tangents
    added by hooks, other parameters as dual tensors (one direction per pass)."""

    def __init__(self, model: nn.Module, selected: dict[str, nn.Parameter],
                 linear: dict[str, tuple[str, str]], generic: list[str], seed: int, distribution: str,
                 logit_of):
        self.model, self.selected, self.generic = model, selected, generic
        self.seed, self.distribution, self.logit_of = seed, distribution, logit_of
        self.index = {name: i for i, name in enumerate(selected)}
        self.tangents = _LinearTangents(model, linear, self.index, seed, distribution)

    def run(self, ids: Tensor, attention: Tensor, batch_idx: Tensor, pos: Tensor, group: list[str],
            directions: range) -> tuple[Tensor, Tensor]:
        """``(z, v . g)`` of the scored tokens for these directions: ``[n, M]`` each."""
        n = len(directions)
        self.tangents.active = set(group)
        self.tangents.directions = directions
        rep_ids, rep_mask = ids.repeat(n, 1), attention.repeat(n, 1)
        duals = {name: fwAD.make_dual(self.selected[name], _direction(
            self.selected[name].shape, self.seed, self.index[name], directions.start, self.distribution,
            self.selected[name].dtype, ids.device)) for name in group if name in self.generic}
        if duals:
            kwargs = {"input_ids": rep_ids, "attention_mask": rep_mask, "use_cache": False}
            hidden = torch.func.functional_call(
                self.model.base_model, {_relative(self.model, name): v for name, v in duals.items()}, (),
                kwargs).last_hidden_state
        else:
            hidden = self.model.base_model(input_ids=rep_ids, attention_mask=rep_mask,
                                           use_cache=False).last_hidden_state
        B, T = ids.shape
        h = hidden.reshape(n, B, T, -1)[:, batch_idx, pos - 1]          # [n, M, H]
        primal, tangent = fwAD.unpack_dual(self.logit_of(h, ids[batch_idx, pos]))
        if tangent is None:
            raise ValueError(f"the selected parameters ({', '.join(list(self.selected)[:3])}, ...) do not "
                             "influence the logits")
        return primal, tangent


def _relative(model: nn.Module, name: str) -> str:
    """``model.layers.0.input_layernorm.weight`` relative to ``model.base_model``."""
    prefix = getattr(model, "base_model_prefix", "")
    if prefix and model.base_model is not model and name.startswith(prefix + "."):
        return name[len(prefix) + 1:]
    return name


def model_token_logits(model: nn.Module, ids: Tensor, attention: Tensor, response: Tensor) -> Tensor:
    """The model's own logits ``z_{t-1}[y_t]`` at the scored tokens (1-D, row-major order)."""
    batch_idx, pos = response.nonzero(as_tuple=True)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=attention, use_cache=False).logits
    return logits[batch_idx, pos - 1].gather(-1, ids[batch_idx, pos][:, None])[:, 0]


# --------------------------------------------------------------------------------------
# Same-position candidate: one backward, cross-position paths dropped.


def _same_position_eager(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Eager attention in which a query differentiates only its own position's key and
    value: other positions' keys and values are constants (detached)."""
    from transformers.integrations.sdpa_attention import repeat_kv

    attention_mask = _additive(attention_mask, query)  # the registered mask is SDPA's (None or bool)
    groups = query.shape[1] // key.shape[1]
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    scores = torch.matmul(query, key.detach().transpose(2, 3)) * scaling
    q_len, n = query.shape[2], scores.shape[-1]
    # Zero in value; its gradient is the own key's path, which the detached keys dropped.
    own_key = (query * (key - key.detach())[:, :, -q_len:]).sum(-1) * scaling      # [b, h, q]
    eye = torch.eye(n, dtype=torch.bool, device=scores.device)[-q_len:]
    scores = scores + eye * own_key[..., None]
    softcap = kwargs.get("softcap")
    if softcap:
        scores = softcap * torch.tanh(scores / softcap)
    if attention_mask is not None:
        scores = scores + attention_mask[:, :, :, :n]
    # At least float32, as eager attention; float64 stays (a float64 mask's minimum is -inf in float32).
    softmax_dtype = torch.promote_types(scores.dtype, torch.float32)
    probs = torch.softmax(scores, dim=-1, dtype=softmax_dtype).to(query.dtype)
    record = _ATTENTION_ENTROPY.get()
    if record is not None:
        with torch.no_grad():
            detached = scores.detach().to(softmax_dtype)
            lse = detached.logsumexp(-1, keepdim=True)
            _record_entropy(record, module, _softmax_entropy((detached - lse).exp(), detached, lse))
    one_hop = _ONE_HOP.get()
    if one_hop is not None and id(module) in one_hop["inputs"]:
        with torch.no_grad():
            one_hop["grams"][id(module)] = _read_input_grams(probs.detach(), one_hop["inputs"][id(module)],
                                                             module)
    diag = (probs * eye).sum(-1, keepdim=True)                    # weight of the own position
    out = torch.matmul(probs, value.detach()) + diag * (value - value.detach())[:, :, -q_len:]
    return out.transpose(1, 2).contiguous(), probs


def _same_position_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """The same attention as :func:`_same_position_eager` (values and gradients), at SDPA's
    cost: ``sdpa(q, sg(k), sg(v))`` carries the value and the query's gradient; the own key's
    and own value's gradients are added by zero-valued first-order terms,
    ``p_tt (v_t - sg v_t) + p_tt (v_t - out_t) s q_t . (k_t - sg k_t)``, with the own-position
    weight ``p_tt`` computed without gradient. The eager version materializes ``[T, T]``
    probabilities with their backward graph, which costs more than a policy forward+backward
    at RL lengths; soft-capped attention (Gemma-2) still takes it."""
    if kwargs.get("softcap"):
        return _same_position_eager(module, query, key, value, attention_mask, scaling, dropout, **kwargs)
    from transformers.integrations.sdpa_attention import repeat_kv

    groups = query.shape[1] // key.shape[1]
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    q_len, n = query.shape[2], key.shape[2]
    # A padded batch: an additive mask with a finite minimum, as eager attention uses (a bool
    # mask gives padding queries no key at all, and their NaN would reach every position).
    mask = None if attention_mask is None else _additive(attention_mask[:, :, :, :n], query)
    out = torch.nn.functional.scaled_dot_product_attention(
        query, key.detach(), value.detach(), attn_mask=mask, is_causal=mask is None and q_len > 1,
        scale=scaling)
    own_weight = _own_position_weight(query.detach(), key.detach(), mask, scaling,
                                      module=module).to(out.dtype)  # [b,h,q,1]
    own_key, own_value = key[:, :, -q_len:], value[:, :, -q_len:]
    # Zero in value; its gradient w.r.t. the own key is s q.
    key_path = (query.detach() * (own_key - own_key.detach())).sum(-1, keepdim=True) * scaling
    out = (out + own_weight * (own_value - own_value.detach())
           + own_weight * (own_value.detach() - out.detach()) * key_path)
    return out.transpose(1, 2).contiguous(), None


def _additive(mask: Tensor | None, like: Tensor) -> Tensor | None:
    """An SDPA mask (None = causal, bool = may attend, or additive) as an additive float mask."""
    q_len = like.shape[2]
    if mask is None:
        n = q_len
        allowed = torch.ones(q_len, n, dtype=torch.bool, device=like.device).tril()
        mask = allowed[None, None]
    if mask.dtype != torch.bool:
        return mask
    return torch.zeros(mask.shape, dtype=like.dtype, device=like.device).masked_fill(
        ~mask, torch.finfo(like.dtype).min)


@torch.no_grad()
def _own_position_weight(query: Tensor, key: Tensor, mask: Tensor | None, scaling: float,
                         chunk: int = 256, module: nn.Module | None = None) -> Tensor:
    """Softmax weight of each query's own position, ``[b, h, q, 1]`` (queries in chunks, so at
    most ``chunk x T`` scores exist at a time; no graph). While :func:`recording_attention_entropy`
    is active, also records each query's attention entropy (mean over heads) for ``module``."""
    q_len, n = query.shape[2], key.shape[2]
    dtype = torch.promote_types(query.dtype, torch.float32)
    out = query.new_empty((*query.shape[:3], 1), dtype=dtype)
    record = _ATTENTION_ENTROPY.get()
    entropy = query.new_empty(query.shape[:3], dtype=dtype) if record is not None else None
    one_hop = _ONE_HOP.get()
    if one_hop is not None and id(module) not in one_hop["inputs"]:
        one_hop = None  # this layer's values are not measured
    grams: list[Tensor] = []
    positions = torch.arange(n, device=query.device)
    for lo in range(0, q_len, chunk):
        hi = min(q_len, lo + chunk)
        scores = (torch.matmul(query[:, :, lo:hi], key.transpose(2, 3)) * scaling).to(dtype)
        own = positions[n - q_len + lo:n - q_len + hi]             # key index of each query's own position
        if mask is None:
            scores = scores.masked_fill(positions > own[:, None], float("-inf"))
        else:
            scores = scores + mask[:, :, lo:hi].to(dtype)
        own_score = scores.gather(-1, own.view(1, 1, -1, 1).expand(*scores.shape[:3], 1))
        lse = scores.logsumexp(-1, keepdim=True)
        out[:, :, lo:hi] = (own_score - lse).exp()
        if entropy is None and one_hop is None:
            continue
        probs = (scores - lse).exp()  # once, for whichever record wants it
        if entropy is not None:
            entropy[:, :, lo:hi] = _softmax_entropy(probs, scores, lse)
        if one_hop is not None:
            grams.append(_read_input_grams(probs, one_hop["inputs"][id(module)], module))
    if record is not None:
        _record_entropy(record, module, entropy)
    if one_hop is not None:
        one_hop["grams"][id(module)] = torch.cat(grams, 1)
    return out


def _softmax_entropy(probs: Tensor, scores: Tensor, lse: Tensor) -> Tensor:
    """Entropy (nats) of ``probs = softmax(scores)`` over the last dim, given its logsumexp;
    masked entries (probability 0, score -inf or a large negative) add nothing."""
    return lse[..., 0] - torch.where(probs > 0, probs * scores, torch.zeros_like(scores)).sum(-1)


# Attention entropy per layer, recorded by the same-position pass when asked for.
_ATTENTION_ENTROPY: contextvars.ContextVar[dict | None] = contextvars.ContextVar("attention_entropy",
                                                                                 default=None)


def _record_entropy(record: dict, module: nn.Module | None, entropy: Tensor) -> None:
    # Keyed by the attention module, in the order of the forward: a checkpointed layer
    # recomputed in the backward overwrites its own entry (same values, same place).
    record[id(module)] = entropy.mean(1)                            # [b, q]


# One-hop value paths, recorded by the same-position pass when asked for.
_ONE_HOP: contextvars.ContextVar[dict | None] = contextvars.ContextVar("one_hop", default=None)


def _read_input_grams(probs: Tensor, inputs: Tensor, module: nn.Module) -> Tensor:
    """``[b, q, kv, g, g]``: per query and key-value head, the Gram matrix of the attention-
    weighted value-projection inputs ``(A_h X)_q`` of the ``g`` query heads sharing that head.
    ``probs``: ``[b, h, q, n]`` attention weights; ``inputs``: ``[b, n, d]`` the v_proj input."""
    b, h, q, _ = probs.shape
    groups = getattr(module, "num_key_value_groups", 1)
    dtype = torch.promote_types(inputs.dtype, torch.float32)
    read = torch.matmul(probs.to(dtype), inputs[:, None].to(dtype))      # [b, h, q, d]
    read = read.view(b, h // groups, groups, q, -1)
    return torch.einsum("bkgqd,bkhqd->bqkgh", read, read)


@contextlib.contextmanager
def recording_attention_entropy() -> Iterator[dict]:
    """Collect, during same-position passes, each attention layer's per-query attention entropy
    (mean over heads, ``[b, q]``), in layer order (the dict's values)."""
    record: dict = {}
    token = _ATTENTION_ENTROPY.set(record)
    try:
        yield record
    finally:
        _ATTENTION_ENTROPY.reset(token)


def _register_same_position() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(_SAME_POSITION_ATTENTION, _same_position_attention)
    # SDPA's mask: None for unpadded causal batches, so SDPA can run its flash kernel.
    AttentionMaskInterface.register(_SAME_POSITION_ATTENTION, sdpa_mask)


@contextlib.contextmanager
def _attention(model: nn.Module, impl: str) -> Iterator[None]:
    saved = model.config._attn_implementation
    model.config._attn_implementation = impl
    try:
        yield
    finally:
        model.config._attn_implementation = saved


@contextlib.contextmanager
def _non_reentrant_checkpointing(model: nn.Module) -> Iterator[None]:
    """Gradient checkpointing (Hugging Face's ``gradient_checkpointing_enable``) stays on, but
    non-reentrant for this pass: reentrant checkpointing runs a layer's forward without a graph
    and rebuilds it inside the backward, so the Linear outputs captured here would not be in
    the graph of ``z``. Non-reentrant checkpointing keeps them there (and still frees the
    activations). Restored on exit."""
    import functools

    from torch.utils.checkpoint import checkpoint

    saved = [(m, m._gradient_checkpointing_func) for m in model.modules()
             if getattr(m, "gradient_checkpointing", False) and hasattr(m, "_gradient_checkpointing_func")]
    try:
        for m, _ in saved:
            m._gradient_checkpointing_func = functools.partial(checkpoint, use_reentrant=False)
        yield
    finally:
        for m, func in saved:
            m._gradient_checkpointing_func = func


@dataclass
class SamePositionNorms:
    """Per-token norms with cross-position paths dropped; ``[B, T]`` (``per_layer``: ``[B, T, L]``)."""

    mask: Tensor
    logits: Tensor          #: [B, T] raw logit z_{t-1}[y_t]
    layer_names: tuple[str, ...]
    per_layer: dict[str, Tensor]
    total: dict[str, Tensor]


def same_position_grad_norms(
    model: nn.Module,
    input_ids: Tensor,
    response_mask: Tensor,
    *,
    attention_mask: Tensor | None = None,
    param_patterns: str | Iterable[str] = DEFAULT_PARAM_PATTERNS,
    norms: str | Sequence[str] = NORMS,
    check_logits: bool = True,
    one_hop_values: bool = False,
) -> SamePositionNorms:
    """L1 / Frobenius / nuclear norms of each scored token's logit gradient through its own
    position only (see the module docstring), for ``nn.Linear`` weights and biases, from one
    forward and one backward for the whole batch.

    The gradient of ``z_{t-1}[y_t]`` for a Linear weight is then ``g x^T`` at position ``t-1``
    (rank 1): L1 ``= |g|_1 |x|_1``, Frobenius = nuclear ``= |g|_2 |x|_2``. ``check_logits``: as
    for :func:`estimate_logit_param_grad_norms`.

    ``one_hop_values``: for the value projections, keep the paths by which the value of every
    earlier position enters the token's own attention read in the same layer (but not their
    effects on later layers): the gradient of ``W_v`` (kv head ``k``) is then
    ``sum_{h in k} u_h (A_h X)_{t-1}^T``, with ``u_h`` the gradient at head ``h``'s attention
    output and ``(A_h X)`` the attention-weighted value-projection inputs; its Frobenius norm
    comes from two ``g x g`` Gram matrices per token and kv head. Frobenius norm only; needs the
    ``o_proj`` of every attention whose ``v_proj`` is selected.
    """
    ids, response, attention = check_batch(input_ids, response_mask, attention_mask)
    norms = [norms] if isinstance(norms, str) else list(norms)
    bad = [n for n in norms if n not in NORMS]
    if bad or not norms:
        raise ValueError(f"norms must be a non-empty subset of {NORMS}, got {norms!r}")
    if one_hop_values and norms != ["fro"]:
        raise ValueError(f"one_hop_values gives Frobenius norms only, got norms={norms!r}")
    model = causal_lm(model)
    selected = select_parameters(model, param_patterns)
    refuse_sharded(model, selected)
    head_weight, logit_of = output_logit_fn(model)
    linear = plain_linear_params(model, selected, head_weight)
    others = [n for n in selected if n not in linear]
    if others:
        raise ValueError("same_position_grad_norms supports nn.Linear weights and biases only; "
                         f"not {others[:3]}")
    _register_same_position()
    names = list(selected)
    layers = tuple(dict.fromkeys(layer_name(n) for n in names))
    modules = list(dict.fromkeys(m for m, _ in linear.values()))
    captured: dict[str, tuple[Tensor, Tensor]] = {}

    def capture(module_name: str):
        def hook(module, args, output):
            captured[module_name] = (args[0].detach(), output)
        return hook

    batch_idx, pos = response.nonzero(as_tuple=True)
    handles = [model.get_submodule(m).register_forward_hook(capture(m)) for m in modules]
    one_hop = _OneHopValues(model, linear, modules) if one_hop_values else None
    token = _ONE_HOP.set(one_hop.record if one_hop else None)
    try:
        with torch.enable_grad(), _attention(model, _SAME_POSITION_ATTENTION), \
                only_requires_grad(model, selected.values()), _non_reentrant_checkpointing(model), \
                (one_hop.hooked() if one_hop else contextlib.nullcontext()):
            base = model.base_model(input_ids=ids, attention_mask=attention, use_cache=False)
            hidden = base.last_hidden_state
            z = logit_of(hidden[batch_idx, pos - 1], ids[batch_idx, pos])
            outputs = [captured[m][1] for m in modules]
            grads = torch.autograd.grad(z.sum(), outputs, allow_unused=True)
    finally:
        _ONE_HOP.reset(token)
        for h in handles:
            h.remove()
    if check_logits:
        check_logits_match(model, z.detach(), model_token_logits(model, ids, attention, response))
    dtype = torch.promote_types(z.dtype, torch.float32)
    inputs = {m: captured[m][0][batch_idx, pos - 1].to(dtype) for m in modules}
    out_grads = {m: None if g is None else g[batch_idx, pos - 1].to(dtype) for m, g in zip(modules, grads)}
    per_param = {norm: torch.stack([_rank_one_norm(out_grads[linear[name][0]], inputs[linear[name][0]],
                                                   linear[name][1], norm, pos.numel(), z)
                                    for name in names], 1) for norm in norms}
    if one_hop:
        for j, name in enumerate(names):
            if linear[name][0] in one_hop.attention_of_value:
                per_param["fro"][:, j] = one_hop.norm(linear[name], out_grads, batch_idx, pos).to(dtype)
    layer_of = [layers.index(layer_name(n)) for n in names]
    per_layer_flat, total_flat = combine_by_layer(per_param, layer_of, len(layers))
    B, T = ids.shape

    def scatter(values: Tensor) -> Tensor:
        out = values.new_zeros((B, T) + values.shape[1:])
        out[batch_idx, pos] = values.detach()
        return out

    return SamePositionNorms(mask=response, logits=scatter(z), layer_names=layers,
                             per_layer={n: scatter(v) for n, v in per_layer_flat.items()},
                             total={n: scatter(v) for n, v in total_flat.items()})


class _OneHopValues:
    """What the one-hop value paths need (see :func:`same_position_grad_norms`): forward hooks
    that keep each attention's value-projection input, the Gram matrices the attention records,
    and the norms from them after the backward."""

    def __init__(self, model: nn.Module, linear: dict[str, tuple[str, str]], modules: list[str]):
        self.attention_of_value: dict[str, tuple[nn.Module, nn.Module]] = {}   # v_proj name -> (attn, o_proj)
        for module_name, _ in linear.values():
            parent_name, _, leaf = module_name.rpartition(".")
            if leaf != "v_proj":
                continue
            parent = model.get_submodule(parent_name)
            if f"{parent_name}.o_proj" not in modules:
                raise ValueError(f"one_hop_values needs {parent_name}.o_proj selected with {module_name}")
            self.attention_of_value[module_name] = (parent, f"{parent_name}.o_proj")
        self.record: dict = {"inputs": {}, "grams": {}}
        self.model = model

    @contextlib.contextmanager
    def hooked(self) -> Iterator[None]:
        def keep(attn: nn.Module):
            def hook(module, args, output):
                self.record["inputs"][id(attn)] = args[0].detach()
            return hook
        handles = [self.model.get_submodule(v).register_forward_hook(keep(attn))
                   for v, (attn, _) in self.attention_of_value.items()]
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def norm(self, module_attr: tuple[str, str], out_grads: dict[str, Tensor | None], batch_idx: Tensor,
             pos: Tensor) -> Tensor:
        """Per scored token, the Frobenius norm of the one-hop gradient of a v_proj weight or bias."""
        module_name, attr = module_attr
        attn, o_name = self.attention_of_value[module_name]
        g_o = out_grads[o_name]
        gram = self.record["grams"][id(attn)][batch_idx, pos - 1]               # [M, kv, g, g]
        kv, groups = gram.shape[1], gram.shape[2]
        u = (g_o @ self.model.get_submodule(o_name).weight.to(g_o.dtype)).view(g_o.shape[0], kv, groups, -1)
        if attr == "bias":   # sum_h u_h (the attention weights of a query add up to 1)
            return u.sum(2).square().sum((1, 2)).sqrt()
        uu = torch.einsum("mkgd,mkhd->mkgh", u, u)
        return (uu * gram.to(uu.dtype)).sum((1, 2, 3)).clamp_min(0).sqrt()


def _rank_one_norm(g: Tensor | None, x: Tensor, attr: str, norm: str, n: int, like: Tensor) -> Tensor:
    """Per token, the norm of a Linear parameter's rank-1 gradient ``g x^T`` (weight) or ``g``
    (bias): L1 ``|g|_1 |x|_1``, Frobenius = nuclear ``|g|_2 |x|_2``; 0 off the logit's path."""
    if g is None:
        return like.new_zeros(n, dtype=x.dtype)
    if norm == "l1":
        return g.abs().sum(-1) * (x.abs().sum(-1) if attr == "weight" else 1)
    return g.norm(dim=-1) * (x.norm(dim=-1) if attr == "weight" else 1)


def last_layers_patterns(model: nn.Module, param_patterns: str | Iterable[str] = DEFAULT_PARAM_PATTERNS,
                         n_layers: int = 2) -> list[str]:
    """The selected parameters of the last ``n_layers`` layers, as exact names (patterns for
    :func:`~entropy_gpu.param_grad.exact.logit_param_grad_norms`): the "exact gradients of
    the last layers only" candidate."""
    n_layers = _check_int("n_layers", n_layers)
    selected = list(select_parameters(model, param_patterns))
    layers = list(dict.fromkeys(layer_name(n) for n in selected))[-n_layers:]
    return [n for n in selected if layer_name(n) in layers]
