"""Float64 references computed the obvious (multi-pass, materializing) way."""

from __future__ import annotations

import torch
from torch import Tensor


def reference_stats(logits: Tensor, targets: Tensor | None = None, temperature: float = 1.0,
                    ignore_index: int = -100) -> dict[str, Tensor]:
    logits = logits.cpu()
    targets = targets.cpu() if targets is not None else None
    x = logits.double() / temperature
    lse = torch.logsumexp(x, dim=-1)
    logp = x - lse.unsqueeze(-1)
    p = logp.exp()
    safe_logp = torch.where(p > 0, logp, 0.0)  # 0 log 0 = 0 for masked entries
    ent = -(p * safe_logp).sum(-1)
    surprisal_dev = safe_logp + ent.unsqueeze(-1)
    out = {
        "logsumexp": lse,
        "entropy": ent,
        "sum_sq_probs": (p * p).sum(-1),
        "varentropy": (p * surprisal_dev**2).sum(-1),
        "entropy_grad_norm": ((p * p * surprisal_dev**2).sum(-1)).sqrt() / temperature,
    }
    if targets is not None:
        ignored = targets == ignore_index
        t = torch.where(ignored, 0, targets).long()
        lp = logp.gather(-1, t.unsqueeze(-1)).squeeze(-1)
        grad = p.clone()  # d(-log p_y)/dx = p - onehot(y)
        grad.scatter_add_(-1, t.unsqueeze(-1), -torch.ones_like(lp).unsqueeze(-1))
        out["logprob"] = torch.where(ignored, 0.0, lp)
        out["nll_grad_norm"] = torch.where(ignored, 0.0, grad.norm(dim=-1) / temperature)
    return out


def reference_entropy_grad(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """dH/dz by autograd in float64 (checks the closed form of entropy_grad_norm)."""
    z = logits.cpu().double().detach().requires_grad_(True)
    logp = torch.log_softmax(z / temperature, dim=-1)
    h = -(logp.exp() * logp).sum()
    (g,) = torch.autograd.grad(h, z)
    return g
