"""What the exact parameter-gradient measure (:mod:`.exact`) and its fast estimates
(:mod:`.estimate`) share: which parameters they differentiate (name patterns, layers,
the plain ``nn.Linear`` weights that take the factored route), how they reach a causal
LM's raw output logit, and the check that this logit is the model's own.

Norms of a group of parameters (a layer) treat the group as one block-diagonal matrix:
L1 and nuclear norms add up over the group, Frobenius norms add in quadrature
(:func:`combine_by_layer`).
"""

from __future__ import annotations

import contextlib
import fnmatch
import re
from collections.abc import Iterable, Iterator, Sequence

import torch
from torch import Tensor, nn

NORMS = ("l1", "fro", "nuclear")
#: Attention projections of Llama-family models (Llama, SmolLM2, Qwen2, Mistral, Gemma, ...).
DEFAULT_PARAM_PATTERNS = (
    "*.self_attn.q_proj.weight",
    "*.self_attn.k_proj.weight",
    "*.self_attn.v_proj.weight",
    "*.self_attn.o_proj.weight",
)
# "model.layers.3.self_attn.q_proj.weight" -> layer "model.layers.3"
_LAYER_RE = re.compile(r"^(.*?\.(?:layers|layer|h|blocks|block)\.\d+)\.")


def layer_name(param_name: str) -> str:
    """The decoder layer a parameter belongs to (``model.layers.3``), else the name itself."""
    match = _LAYER_RE.match(param_name)
    return match.group(1) if match else param_name


def select_parameters(model: nn.Module, patterns: str | Iterable[str] = DEFAULT_PARAM_PATTERNS
                      ) -> dict[str, nn.Parameter]:
    """Parameters of ``model`` whose names match any of the glob ``patterns``
    (``fnmatch`` syntax, e.g. ``"*.self_attn.q_proj.weight"``), in model order.

    A PEFT-wrapped layer keeps its frozen base weight as ``q_proj.base_layer.weight``; it
    matches as ``q_proj.weight`` (the measured weight is the base one, never the adapter's).
    Raises ``ValueError`` for an empty pattern list or a pattern that matches nothing.
    """
    patterns = [patterns] if isinstance(patterns, str) else list(patterns)
    if not patterns:
        raise ValueError("param_patterns is empty: give at least one parameter name pattern")
    named = dict(model.named_parameters())

    def matches(name: str, pattern: str) -> bool:
        return (fnmatch.fnmatchcase(name, pattern)
                or fnmatch.fnmatchcase(name.replace(".base_layer.", "."), pattern))

    unmatched = [p for p in patterns if not any(matches(n, p) for n in named)]
    if unmatched:
        examples = ", ".join(list(named)[:6])
        raise ValueError(
            f"parameter pattern(s) {unmatched} match no parameter of {type(model).__name__}; "
            f"names look like: {examples}, ... (patterns use fnmatch syntax, "
            "e.g. '*.self_attn.q_proj.weight')")
    return {n: p for n, p in named.items() if any(matches(n, pat) for pat in patterns)}


def causal_lm(model: nn.Module) -> nn.Module:
    """The Hugging Face causal LM inside a PEFT wrapper (``PeftModel.get_base_model()``, LoRA
    layers included), else ``model``. Its ``base_model`` gives the last hidden state."""
    get_base = getattr(model, "get_base_model", None)
    if callable(get_base) and type(model).__module__.startswith("peft."):
        return get_base()
    return model


def refuse_sharded(model: nn.Module, selected: dict[str, nn.Parameter]) -> None:
    """Raise ``NotImplementedError`` for a sharded model (FSDP, DeepSpeed ZeRO-3): its
    parameters outside the forward are shards, so per-parameter norms and the LM-head row
    would be a shard's, silently wrong."""
    fsdp = []
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
        fsdp.append(FullyShardedDataParallel)
    except ImportError:  # pragma: no cover - torch without distributed
        pass
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover
        DTensor = ()  # noqa: N806
    why = None
    if fsdp and any(isinstance(m, tuple(fsdp)) for m in model.modules()):
        why = "it is wrapped in FSDP"
    else:
        for name, p in selected.items():
            if DTensor and isinstance(p, DTensor):
                why = f"parameter {name} is a DTensor (FSDP2 / tensor parallel)"
            elif hasattr(p, "ds_id") or hasattr(p, "ds_numel"):
                why = f"parameter {name} is partitioned by DeepSpeed ZeRO-3"
            elif getattr(p, "_is_flat_param", False):
                why = f"parameter {name} is an FSDP flat parameter"
            if why:
                break
        if why is None:
            for module_name, module in model.named_modules():
                w = getattr(module, "weight", None)
                if isinstance(module, nn.Linear) and isinstance(w, Tensor) and \
                        tuple(w.shape) != (module.out_features, module.in_features):
                    why = f"{module_name}.weight has shape {tuple(w.shape)}, not its layer's (a shard)"
                    break
    if why:
        raise NotImplementedError(
            f"the parameter-gradient measure does not support sharded models: {why}. Its per-token "
            "gradients and the LM-head row would be those of one shard. Use DDP or one process "
            "(the model replicated), or a logit-space measure (CorrPOConfig(measure='nll_grad_norm'))")


@contextlib.contextmanager
def only_requires_grad(model: nn.Module, params: Iterable[nn.Parameter]) -> Iterator[None]:
    """Autograd tracks just the selected parameters (a smaller graph); restored on exit."""
    saved = [(p, p.requires_grad) for p in model.parameters()]
    wanted = {id(p) for p in params}
    try:
        for p, _ in saved:
            p.requires_grad_(id(p) in wanted)
        yield
    finally:
        for p, flag in saved:
            p.requires_grad_(flag)


def output_logit_fn(model: nn.Module):
    """Raw logit of token ``y`` from the final hidden state ``h``: ``h . W[y] (+ b[y])``,
    with final-logit soft-capping where the config has it (Gemma-2)."""
    head = model.get_output_embeddings()
    if head is None or not hasattr(head, "weight"):
        raise ValueError(f"{type(model).__name__} has no output embedding (LM head); need a causal LM")
    bias = getattr(head, "bias", None)
    cap = getattr(model.config, "final_logit_softcapping", None)

    def logit(hidden: Tensor, token_ids: Tensor) -> Tensor:
        # At least float32: a bf16 product-then-sum would round far more than the LM head's matmul.
        dtype = torch.promote_types(hidden.dtype, torch.float32)
        z = (hidden.to(dtype) * head.weight[token_ids].to(dtype)).sum(-1)
        if bias is not None:
            z = z + bias[token_ids].to(dtype)
        if cap:
            z = cap * torch.tanh(z / cap)
        return z

    return head.weight, logit


def plain_linear_params(model: nn.Module, selected: dict[str, nn.Parameter], head_weight: Tensor
                         ) -> dict[str, tuple[str, str]]:
    """Selected parameters that are the weight or bias of exactly one plain ``nn.Linear``
    and read by nothing else (not tied, not the LM-head row we index): these take the
    factored route. Maps parameter name -> (module name, "weight" | "bias")."""
    owners: dict[int, list[tuple[nn.Module, str, str]]] = {}
    for module_name, module in model.named_modules():
        for attr, p in module.named_parameters(recurse=False):
            owners.setdefault(id(p), []).append((module, module_name, attr))
    plain = {}
    for name, p in selected.items():
        own = owners.get(id(p), [])
        if len(own) == 1 and type(own[0][0]) is nn.Linear and p is not head_weight:
            plain[name] = (own[0][1], own[0][2])
    return plain


def combine_by_layer(per_param: dict[str, Tensor], layer_of_param: Sequence[int], n_layers: int
             ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Block-diagonal combination: L1 and nuclear norms add, Frobenius norms add in quadrature."""
    index = torch.tensor(layer_of_param, dtype=torch.long)
    per_layer, total = {}, {}
    for norm, values in per_param.items():
        squared = norm == "fro"
        v = values.square() if squared else values
        layer = torch.zeros(v.shape[0], n_layers, dtype=v.dtype, device=v.device)
        layer.index_add_(1, index.to(v.device), v)
        whole = v.sum(1)
        per_layer[norm] = layer.sqrt() if squared else layer
        total[norm] = whole.sqrt() if squared else whole
    return per_layer, total


#: Relative tolerance of the logit check per compute dtype: ~5 units in the last place of
#: bf16 (8 bits) and ~10 of fp16 (11 bits); float32 / float64 models run Hugging Face's RMSNorm
#: and softmax in float32, so 1e-4. Used for ``rtol`` and, times ``1 + max |logit|``, for
#: ``atol``: a forward's rounding error is relative to the activations' scale, not to each
#: logit (a logit near 0 is a difference of large terms).
LOGIT_CHECK_RTOL = {torch.bfloat16: 2e-2, torch.float16: 5e-3, torch.float32: 1e-4, torch.float64: 1e-4}


def compute_dtype(model: nn.Module, *tensors: Tensor) -> torch.dtype:
    """The least precise floating dtype that may have computed ``tensors`` (logits) with
    ``model``: their own dtypes, the model's parameter dtypes, an autocast active here on their
    device, and accelerate's mixed-precision ``forward`` wrapper (autocast inside ``forward``,
    outputs cast back to float32; its dtype is not recorded, so bf16, the coarser one)."""
    dtypes = {t.dtype for t in tensors if t.is_floating_point()}
    dtypes |= {p.dtype for p in model.parameters() if p.is_floating_point()}
    for device_type in {t.device.type for t in tensors}:
        if torch.is_autocast_enabled(device_type):
            dtypes.add(torch.get_autocast_dtype(device_type))
    if getattr(model, "_original_forward", None) is not None:  # accelerate's autocast wrapper
        dtypes.add(torch.bfloat16)
    dtypes = {d for d in dtypes if d in LOGIT_CHECK_RTOL} or {torch.float32}
    return max(dtypes, key=lambda d: torch.finfo(d).eps)


def check_logits_match(model: nn.Module, ours: Tensor, model_logits: Tensor,
                       dtype: torch.dtype | None = None) -> None:
    """Raise ``ValueError`` unless ``ours`` (``h . W[y]`` of the base model's last hidden
    state) equals the model's own logits of the same tokens (1-D tensors). This catches LM
    heads with extra post-processing and non-causal models. Compared in float32 (at least)
    with the tolerance of ``dtype``, the least precise dtype either side was computed in
    (default: :func:`compute_dtype`)."""
    dtype = compute_dtype(model, ours, model_logits) if dtype is None else dtype
    scale = LOGIT_CHECK_RTOL.get(dtype, 1e-4)
    wide = torch.promote_types(torch.promote_types(ours.dtype, model_logits.dtype), torch.float32)
    ours, model_logits = ours.to(wide), model_logits.to(wide)
    if not torch.allclose(ours, model_logits, rtol=scale, atol=scale * (1 + model_logits.abs().max().item())):
        err = (ours - model_logits).abs().max().item()
        raise ValueError(
            f"{type(model).__name__}'s logits are not h . W[y] of base_model's last hidden state on the "
            f"prefix (max difference {err:.3g}, tolerance for {dtype} computation {scale:g} relative); "
            "this model is not supported by logit_param_grad_norms")
