"""Exact parameter-gradient norms of the sampled token's logit (the CorR-PO paper's
gradient measure), for small models.

For every response token ``y_t`` (at position ``t`` of ``input_ids``) this computes
the gradient of the model's **raw, pre-temperature logit** ``z_{t-1}[y_t]`` -- the
logit, at the position that predicts ``y_t``, of the token that was actually
sampled -- with respect to the weights of chosen layers (by default the attention
projections q/k/v/o of every decoder layer), and reduces it per parameter matrix
and per layer by the L1, Frobenius or nuclear norm. Temperature only rescales this
gradient by ``1/t``, so it is left out.

It costs one backward pass per token (SPEC section 1): a slow reference, to check
how well the cheap logit-space measures of :func:`entropy_gpu.token_stats` track
it. What keeps it affordable on a CPU is exact:

* The logit is computed as ``h_{t-1} . W[y_t]`` from the final hidden state and
  the output-embedding row, instead of through the full LM head (which would
  cost a ``V x hidden`` product per backward). It is checked against the model's
  own logits from one no-grad forward of the whole sequence.
* Causality: the tokens of a chunk of 16 share one forward over the prefix they
  need, so a backward runs over ``t`` positions, not the whole sequence.
* For a weight of a plain ``nn.Linear`` (``y = x W^T + b``) the per-token gradient
  is ``dW = G^T X``, with ``G`` the gradient at the layer's output and ``X`` its
  input, over the ``k`` positions where ``G`` is nonzero. So the backward stops at
  the layer outputs, and when ``k < min(out, in)`` the nuclear norm comes from a
  ``k x k`` matrix (two thin QR factorisations). Nuclear norms are square roots of
  Gram-matrix eigenvalues in float64 (several times faster than an SVD on a CPU).
  Other parameters (norm weights, embeddings, subclassed linears) get their
  gradient from autograd directly.

Norms of a group of parameters (a layer) treat the group as one block-diagonal
matrix: L1 and nuclear norms add up over the group, Frobenius norms add in
quadrature. A 1-D parameter (a bias) is a 1 x n matrix, so its nuclear norm is its
L2 norm; parameters with more than two dimensions are flattened to
``(shape[0], -1)``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
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

_TOKENS_PER_FORWARD = 16  # response tokens sharing one prefix forward (and its retained graph)


@dataclass
class ParamGradNorms:
    """Per-token norms of ``d z_{t-1}[y_t] / d theta`` for one sequence.

    ``n`` is the number of response tokens. Norm tensors are float32 (float64 for a
    float64 model).
    """

    positions: Tensor       #: [n] index in ``input_ids`` of each response token ``y_t``
    token_ids: Tensor       #: [n] the tokens ``y_t``
    logits: Tensor          #: [n] raw logit ``z_{t-1}[y_t]`` (pre-temperature)
    hidden_norm: Tensor     #: [n] ``||h_{t-1}||_2``, the LM head's input at that position
    param_names: tuple[str, ...]
    layer_names: tuple[str, ...]
    layer_of_param: tuple[int, ...]     #: index into ``layer_names`` for each parameter
    per_param: dict[str, Tensor]        #: norm -> [n, len(param_names)]
    per_layer: dict[str, Tensor]        #: norm -> [n, len(layer_names)]
    total: dict[str, Tensor]            #: norm -> [n], all selected parameters as one block matrix


def _check_norms(norms: str | Iterable[str]) -> tuple[str, ...]:
    names = [norms] if isinstance(norms, str) else list(norms)
    if not names:
        raise ValueError(f"norms is empty: choose from {NORMS}")
    unknown = [n for n in names if n not in NORMS]
    if unknown:
        raise ValueError(f"unsupported norm(s) {unknown}; choose from {NORMS}")
    return tuple(dict.fromkeys(names))


def _check_input_ids(input_ids: object, response_start: object) -> tuple[Tensor, int]:
    if not isinstance(input_ids, Tensor):
        raise TypeError(f"input_ids must be a torch.Tensor, got {type(input_ids).__name__}")
    if input_ids.dim() == 2 and input_ids.shape[0] == 1:
        input_ids = input_ids[0]
    if input_ids.dim() != 1:
        raise ValueError(f"input_ids must be one sequence, shape [T] or [1, T], got {tuple(input_ids.shape)}")
    if input_ids.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"input_ids must be int64 or int32 token ids, got {input_ids.dtype}")
    if isinstance(response_start, bool) or not isinstance(response_start, int):
        raise TypeError("response_start must be an int (the prompt length), "
                        f"got {type(response_start).__name__}")
    n_tokens = input_ids.numel()
    if response_start < 1:
        raise ValueError(
            "response_start must be >= 1 (a response token needs a preceding position), "
            f"got {response_start}")
    if response_start >= n_tokens:
        raise ValueError(
            f"empty response: response_start={response_start} but input_ids has {n_tokens} tokens; "
            "pass prompt + response ids with response_start = prompt length")
    return input_ids.long(), response_start


def matrix_norms(grad: Tensor, norms: Sequence[str]) -> dict[str, Tensor]:
    """L1 (sum of |entries|), Frobenius and nuclear norms of one gradient tensor
    (1-D: a 1 x n matrix; more than 2-D: flattened to ``(shape[0], -1)``)."""
    out = {}
    if "l1" in norms:
        out["l1"] = grad.abs().sum()
    if "fro" in norms:
        out["fro"] = torch.linalg.vector_norm(grad)
    if "nuclear" in norms:
        if grad.dim() <= 1:
            out["nuclear"] = torch.linalg.vector_norm(grad)
        else:
            out["nuclear"] = nuclear_norm(grad.reshape(grad.shape[0], -1))
    return out


def nuclear_norm(matrix: Tensor) -> Tensor:
    """Sum of singular values, as the square roots of the eigenvalues of the smaller
    Gram matrix in float64 (several times faster than an SVD on a CPU; the squared
    condition number costs at most ~1e-8 * sigma_max per singular value in float64)."""
    m = matrix.double()
    gram = m @ m.T if m.shape[0] <= m.shape[1] else m.T @ m
    return torch.linalg.eigvalsh(gram).clamp_min(0).sqrt().sum().to(matrix.dtype)


def _factored_linear_norms(out_grad: Tensor, inputs: Tensor, norms: Sequence[str], *, with_weight: bool,
                           with_bias: bool) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Norms of ``dW = out_grad^T inputs`` and ``db = out_grad.sum(0)`` for one token.

    ``out_grad`` [rows, out] and ``inputs`` [rows, in]. Rows where ``out_grad`` is zero
    add nothing to either gradient and are dropped first.
    """
    keep = out_grad.abs().amax(dim=1) > 0
    g, x = out_grad[keep], inputs[keep]
    weight_norms: dict[str, Tensor] = {}
    if with_weight:
        rank_bound = g.shape[0]
        factored = "nuclear" in norms and rank_bound < min(g.shape[1], x.shape[1])
        dense_norms = [n for n in norms if not (factored and n == "nuclear")]
        if dense_norms:
            weight_norms = matrix_norms(g.T @ x, dense_norms)
        if factored and rank_bound == 0:
            weight_norms["nuclear"] = g.new_zeros(())
        elif factored:
            # g^T x = Q_g R_g R_x^T Q_x^T with orthonormal Q's: same singular values as R_g R_x^T (k x k).
            r_g = torch.linalg.qr(g.T, mode="r").R
            r_x = torch.linalg.qr(x.T, mode="r").R
            weight_norms["nuclear"] = nuclear_norm(r_g @ r_x.T)
    bias_norms = matrix_norms(g.sum(0), norms) if with_bias else {}
    return weight_norms, bias_norms


def logit_param_grad_norms(
    model: nn.Module,
    input_ids: Tensor,
    response_start: int,
    *,
    param_patterns: str | Iterable[str] = DEFAULT_PARAM_PATTERNS,
    norms: str | Iterable[str] = NORMS,
    token_batch_size: int = 1,
    progress: bool = False,
) -> ParamGradNorms:
    """Norms of the gradient of each response token's raw logit w.r.t. chosen parameters.

    Args:
        model: a Hugging Face causal LM (``model.base_model`` gives the final hidden
            state, ``model.get_output_embeddings()`` the LM head). Its
            ``requires_grad`` flags are restored on return.
        input_ids: one sequence, prompt followed by response, shape ``[T]`` or ``[1, T]``.
        response_start: index of the first response token (the prompt length). Tokens
            ``response_start .. T-1`` are scored; the logit of ``y_t`` is read at ``t-1``.
        param_patterns: fnmatch patterns over ``model.named_parameters()`` names;
            default: q/k/v/o attention projection weights of every layer.
        norms: any of ``"l1"``, ``"fro"``, ``"nuclear"``.
        token_batch_size: tokens per backward call. Above 1, one vmapped backward
            (``is_grads_batched``) serves several tokens: same results, faster on a GPU,
            more memory; on a CPU it saves little.
        progress: show a progress bar over tokens.

    Returns:
        :class:`ParamGradNorms` with per-parameter, per-layer and total norms.

    Raises:
        ValueError: a pattern matching no parameter, an unsupported norm, an empty
            response, or a model whose logits are not ``h . W[y]`` of its base model's
            last hidden state.
    """
    ids, start = _check_input_ids(input_ids, response_start)
    norms = _check_norms(norms)
    if isinstance(token_batch_size, bool) or not isinstance(token_batch_size, int) or token_batch_size < 1:
        raise ValueError(f"token_batch_size must be a positive int, got {token_batch_size!r}")
    model = causal_lm(model)
    selected = select_parameters(model, param_patterns)
    refuse_sharded(model, selected)
    param_names = tuple(selected)
    layer_names = tuple(dict.fromkeys(layer_name(n) for n in param_names))
    layer_of_param = tuple(layer_names.index(layer_name(n)) for n in param_names)
    head_weight, logit_of = output_logit_fn(model)
    device = next(model.parameters()).device
    ids = ids.to(device)
    positions = torch.arange(start, ids.numel(), device=device)
    targets = ids[positions]
    model_logits = _model_logits(model, ids, positions, targets)
    linear_params = plain_linear_params(model, selected, head_weight)
    linear_modules = {m: model.get_submodule(m) for m, _ in linear_params.values()}

    n = positions.numel()
    norm_dtype = torch.float64 if model_logits.dtype == torch.float64 else torch.float32
    per_param = {norm: torch.zeros(n, len(param_names), dtype=norm_dtype) for norm in norms}
    logits_out = torch.zeros(n, dtype=norm_dtype)
    hidden_norm = torch.zeros(n, dtype=norm_dtype)
    # Causal model: the logits of tokens lo..hi-1 need only the prefix up to position
    # positions[hi-1] - 1, so each chunk runs its own (shorter) forward and backwards.
    chunk = token_batch_size * max(1, _TOKENS_PER_FORWARD // token_batch_size)
    bar = _progress(n, progress)
    with only_requires_grad(model, selected.values()), torch.enable_grad():
        for lo in range(0, n, chunk):
            hi = min(lo + chunk, n)
            captured: dict[str, list[tuple[Tensor, Tensor]]] = {m: [] for m in linear_modules}
            hooks = [module.register_forward_hook(_capture_into(captured[m]))
                     for m, module in linear_modules.items()]
            try:
                prefix = ids[None, : int(positions[hi - 1])]
                hidden = model.base_model(input_ids=prefix, use_cache=False).last_hidden_state[0]
            finally:
                for hook in hooks:
                    hook.remove()
            hidden_at = hidden[positions[lo:hi] - 1]
            logits = logit_of(hidden_at, targets[lo:hi])
            check_logits_match(model, logits.detach(), model_logits[lo:hi])
            if not logits.requires_grad:
                raise ValueError(
                    f"the selected parameters ({', '.join(param_names[:3])}, ...) "
                    "do not influence the logits")
            logits_out[lo:hi] = logits.detach().to(norm_dtype).cpu()
            hidden_norm[lo:hi] = torch.linalg.vector_norm(hidden_at.detach().to(norm_dtype), dim=-1).cpu()

            _chunk_param_norms(logits, lo, captured, linear_params, linear_modules, selected, norms,
                               token_batch_size, per_param, bar)
            del captured, hidden, logits
    bar.close()

    per_layer, total = combine_by_layer(per_param, layer_of_param, len(layer_names))
    return ParamGradNorms(
        positions=positions.cpu(), token_ids=targets.cpu(), logits=logits_out, hidden_norm=hidden_norm,
        param_names=param_names, layer_names=layer_names, layer_of_param=layer_of_param,
        per_param=per_param, per_layer=per_layer, total=total,
    )


def _chunk_param_norms(logits: Tensor, lo: int, captured: dict[str, list[tuple[Tensor, Tensor]]],
                       linear_params: dict[str, tuple[str, str]], linear_modules: dict[str, nn.Module],
                       selected: dict[str, nn.Parameter], norms: Sequence[str], token_batch_size: int,
                       per_param: dict[str, Tensor], bar) -> None:
    """Write the norms of the gradients of ``logits`` (the tokens ``lo, lo + 1, ...``) into
    rows ``lo ...`` of ``per_param``, ``token_batch_size`` tokens per backward call.
    ``captured``: the (input, output) of every call of each plain Linear in this chunk's forward."""
    norm_dtype = next(iter(per_param.values())).dtype
    columns = {name: i for i, name in enumerate(selected)}
    # A Linear whose hook never fired (not on the path to the hidden state) goes to autograd.
    factored = {name: ma for name, ma in linear_params.items() if captured[ma[0]]}
    direct_names = [name for name in selected if name not in factored]
    module_names = list(dict.fromkeys(m for m, _ in factored.values()))
    # One backward target per call of a module (its output); its inputs are the other factor.
    outputs = {m: [y for _, y in captured[m]] for m in module_names}
    inputs = {m: torch.cat([x.reshape(-1, linear_modules[m].in_features) for x, _ in captured[m]])
              .to(norm_dtype) for m in module_names}
    attrs = {m: {a for mm, a in factored.values() if mm == m} for m in module_names}
    grad_targets = ([y for m in module_names for y in outputs[m]]
                    + [selected[name] for name in direct_names])

    n = logits.numel()
    for batch_lo in range(0, n, token_batch_size):
        batch_hi = min(batch_lo + token_batch_size, n)
        grads = iter(_token_grads(logits, batch_lo, batch_hi, grad_targets))
        out_grads = {m: [next(grads) for _ in outputs[m]] for m in module_names}
        direct_grads = {name: next(grads) for name in direct_names}
        for b in range(batch_hi - batch_lo):
            row = lo + batch_lo + b
            for m in module_names:
                width = linear_modules[m].out_features
                out_grad = torch.cat([(torch.zeros_like(y) if g is None else g[b]).reshape(-1, width)
                                      for g, y in zip(out_grads[m], outputs[m])]).to(norm_dtype)
                w_norms, b_norms = _factored_linear_norms(out_grad, inputs[m], norms,
                                                          with_weight="weight" in attrs[m],
                                                          with_bias="bias" in attrs[m])
                for attr, values in (("weight", w_norms), ("bias", b_norms)):
                    for norm, value in values.items():
                        per_param[norm][row, columns[f"{m}.{attr}"]] = value
            for name, g in direct_grads.items():
                grad = torch.zeros_like(selected[name]) if g is None else g[b]
                for norm, value in matrix_norms(grad.to(norm_dtype), norms).items():
                    per_param[norm][row, columns[name]] = value
            bar.update(1)


def _capture_into(calls: list[tuple[Tensor, Tensor]]):
    def hook(module: nn.Module, args: tuple, output: Tensor) -> None:
        calls.append((args[0].detach(), output))
    return hook


def _token_grads(logits: Tensor, lo: int, hi: int, targets: list[Tensor]) -> list[Tensor | None]:
    """Gradients of ``logits[lo:hi]`` w.r.t. ``targets``, each with a leading token dim
    (None where a target does not influence the logits)."""
    if hi - lo == 1:
        grads = torch.autograd.grad(logits[lo], targets, retain_graph=True, allow_unused=True)
        return [None if g is None else g[None] for g in grads]
    one_hot = torch.eye(logits.numel(), dtype=logits.dtype, device=logits.device)[lo:hi]
    return list(torch.autograd.grad(logits, targets, grad_outputs=one_hot, retain_graph=True,
                                    allow_unused=True, is_grads_batched=True))


def _model_logits(model: nn.Module, ids: Tensor, positions: Tensor, targets: Tensor) -> Tensor:
    """The model's own logits ``z_{t-1}[y_t]``, from one no-grad forward of the whole sequence."""
    with torch.no_grad():
        return model(input_ids=ids[None], use_cache=False).logits[0, positions - 1].gather(
            -1, targets[:, None])[:, 0]


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(total: int, enabled: bool):
    if not enabled:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="logit gradients", unit="tok")
