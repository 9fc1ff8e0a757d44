"""The exact parameter-gradient Frobenius norm of every scored token's logit, for a whole padded
batch at once: the paper's measure (as :func:`logit_param_grad_norms`), fast enough for RL on
small models.

Per token ``y_t`` the gradient of ``z_{t-1}[y_t]`` for a Linear weight is ``sum_i g_i x_i^T`` over
the positions ``i`` of its sequence (``g_i``: gradient at the layer's output, ``x_i``: its
input). One vmapped backward (``is_grads_batched``) per chunk of ``c`` token indices gives the
output gradients for the ``c``-th scored token of every row together (rows do not interact),
and ``||sum_i g_i x_i^T||_F`` is formed from them and the captured inputs. Cost: about one
backward pass of the batch per scored token index, so ``max_tokens`` backward passes,
vectorised; cross-position paths are all kept (exact).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

from .estimate import SamePositionNorms, check_batch
from .model_parts import (
    DEFAULT_PARAM_PATTERNS,
    causal_lm,
    combine_by_layer,
    layer_name,
    only_requires_grad,
    output_logit_fn,
    plain_linear_params,
    refuse_sharded,
    select_parameters,
)


def batched_logit_param_grad_norms(
    model: nn.Module,
    input_ids: Tensor,
    response_mask: Tensor,
    *,
    attention_mask: Tensor | None = None,
    param_patterns: str | Iterable[str] = DEFAULT_PARAM_PATTERNS,
    token_chunk: int = 8,
) -> SamePositionNorms:
    """Exact Frobenius norm of ``d z_{t-1}[y_t] / d theta`` for every token marked in
    ``response_mask`` (``[B, T]``, left or right padding), ``theta`` the selected ``nn.Linear``
    weights and biases (default: q/k/v/o projections of every layer).

    Equal to :func:`entropy_gpu.logit_param_grad_norms` run on each sequence alone (tested);
    ``token_chunk`` token indices share one vmapped backward (memory ~ ``token_chunk`` times a
    backward's activations). Returns ``SamePositionNorms`` with ``total["fro"]`` and
    ``per_layer["fro"]`` ``[B, T]`` (0 outside the mask) and the raw logits.
    """
    ids, response, attention = check_batch(input_ids, response_mask, attention_mask)
    if isinstance(token_chunk, bool) or not isinstance(token_chunk, int) or token_chunk < 1:
        raise ValueError(f"token_chunk must be a positive int, got {token_chunk!r}")
    model = causal_lm(model)
    selected = select_parameters(model, param_patterns)
    refuse_sharded(model, selected)
    head_weight, logit_of = output_logit_fn(model)
    linear = plain_linear_params(model, selected, head_weight)
    others = [n for n in selected if n not in linear]
    if others:
        raise ValueError(
            f"batched_logit_param_grad_norms supports nn.Linear weights and biases only; not {others[:3]}"
        )
    names = list(selected)
    layers = tuple(dict.fromkeys(layer_name(n) for n in names))
    modules = list(dict.fromkeys(m for m, _ in linear.values()))
    captured: dict[str, tuple[Tensor, Tensor]] = {}

    def capture(module_name: str):
        def hook(module, args, output):
            captured[module_name] = (args[0].detach(), output)

        return hook

    B, T = ids.shape
    # The j-th scored token of each row: position[b, j] (rows with fewer tokens are padded).
    counts = response.sum(1)
    width = int(counts.max())
    order = torch.argsort((~response).to(torch.int8), dim=1, stable=True)[:, :width]
    slot_valid = torch.arange(width, device=ids.device)[None] < counts[:, None]
    positions = torch.where(slot_valid, order, 1)
    rows = torch.arange(B, device=ids.device)[:, None].expand(B, width)
    handles = [model.get_submodule(m).register_forward_hook(capture(m)) for m in modules]
    try:
        with torch.enable_grad(), only_requires_grad(model, selected.values()):
            hidden = model.base_model(
                input_ids=ids, attention_mask=attention, use_cache=False
            ).last_hidden_state
            z = logit_of(hidden[rows, positions - 1], ids[rows, positions])  # [B, width]
            z = torch.where(slot_valid, z, z.detach() * 0)
            outputs = [captured[m][1] for m in modules]
            dtype = torch.promote_types(z.dtype, torch.float32)
            per_param = torch.zeros(B, width, len(names), dtype=dtype, device=ids.device)
            for lo in range(0, width, token_chunk):
                hi = min(lo + token_chunk, width)
                cotangents = torch.zeros(hi - lo, B, width, dtype=z.dtype, device=z.device)
                cotangents[torch.arange(hi - lo), :, torch.arange(lo, hi)] = 1.0
                grads = torch.autograd.grad(
                    z,
                    outputs,
                    grad_outputs=cotangents,
                    is_grads_batched=True,
                    retain_graph=True,
                    allow_unused=True,
                )
                by_module = dict(zip(modules, grads))
                for j, name in enumerate(names):
                    module, kind = linear[name]
                    g = by_module[module]
                    if g is None:
                        continue
                    g = g.to(dtype)  # [c, B, T, out]
                    if kind == "weight":
                        x = captured[module][0].to(dtype)  # [B, T, in]
                        sq = torch.einsum("cbio,bik->cbok", g, x).pow(2).sum((-1, -2))
                    else:
                        sq = g.sum(2).pow(2).sum(-1)
                    per_param[:, lo:hi, j] = sq.sqrt().transpose(0, 1)
                del grads, by_module
    finally:
        for h in handles:
            h.remove()
    layer_of = [layers.index(layer_name(n)) for n in names]
    flat = {"fro": per_param.reshape(B * width, len(names))}
    per_layer_flat, total_flat = combine_by_layer(flat, layer_of, len(layers))
    b_idx, slot = slot_valid.nonzero(as_tuple=True)
    pos = positions[b_idx, slot]

    def scatter(values: Tensor) -> Tensor:
        values = values.reshape(B, width, *values.shape[1:])[b_idx, slot]
        out = values.new_zeros((B, T) + values.shape[1:])
        out[b_idx, pos] = values.detach()
        return out

    return SamePositionNorms(
        mask=response,
        logits=scatter(z.detach().reshape(B * width)),
        layer_names=layers,
        per_layer={"fro": scatter(per_layer_flat["fro"])},
        total={"fro": scatter(total_flat["fro"])},
    )
