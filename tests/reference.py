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
        out["entropy_change"] = torch.where(ignored, 0.0, reference_entropy_change(logits, t, temperature))
    return out


def reference_entropy_change(logits: Tensor, targets: Tensor, temperature: float = 1.0) -> Tensor:
    """``grad_z H . grad_z log p_y`` of every row by float64 autograd (two gradients, then
    their dot product; rows are independent, so one backward of each summed field)."""
    z = logits.cpu().double().detach().requires_grad_(True)
    ent, lp = reference_logprob_entropy(z, targets.cpu(), temperature, ignore_index=-(2**62))
    (grad_entropy,) = torch.autograd.grad(ent.sum(), z, retain_graph=True)
    (grad_logprob,) = torch.autograd.grad(lp.sum(), z)
    return (grad_entropy * grad_logprob).sum(-1)


def entropy_after_logit_step(logits: Tensor, targets: Tensor, eta: float, temperature: float = 1.0) -> Tensor:
    """``H(softmax((z + eta grad_z log p_y) / t))`` in float64: the entropy after a step of
    size ``eta`` along the target's log-prob gradient on the logits (the finite-difference
    side of ``entropy_change``). Masked (-inf) logits stay masked."""
    z = logits.cpu().double()
    t = targets.cpu().long()
    p = torch.softmax(z / temperature, dim=-1)
    step = (torch.nn.functional.one_hot(t, z.shape[-1]).double() - p) / temperature
    stepped = torch.where(torch.isinf(z), z, z + eta * step)
    ent, _ = reference_logprob_entropy(stepped, None, temperature)
    return ent


def reference_entropy_grad(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """dH/dz by autograd in float64 (checks the closed form of entropy_grad_norm)."""
    z = logits.cpu().double().detach().requires_grad_(True)
    logp = torch.log_softmax(z / temperature, dim=-1)
    h = -(logp.exp() * logp).sum()
    (g,) = torch.autograd.grad(h, z)
    return g


def reference_logprob_entropy(z: Tensor, targets: Tensor | None, temperature: float = 1.0,
                              ignore_index: int = -100) -> tuple[Tensor, Tensor | None]:
    """(entropy, logprob) of float64 ``z`` by differentiable multi-pass torch ops
    (0 log 0 = 0; ignored rows give logprob 0)."""
    logp = torch.log_softmax(z / temperature, dim=-1)
    p = logp.exp()
    ent = -(p * torch.where(p > 0, logp, 0.0)).sum(-1)
    if targets is None:
        return ent, None
    ignored = targets == ignore_index
    lp = logp.gather(-1, torch.where(ignored, 0, targets).long().unsqueeze(-1)).squeeze(-1)
    return ent, torch.where(ignored, 0.0, lp)


def reference_grad(logits: Tensor, targets: Tensor | None, grad_entropy: Tensor | None,
                   grad_logprob: Tensor | None, temperature: float = 1.0, ignore_index: int = -100) -> Tensor:
    """d(sum(grad_entropy * H) + sum(grad_logprob * logprob)) / d logits, by autograd in
    float64 on the CPU."""
    targets = targets.cpu() if targets is not None else None
    grad_entropy = grad_entropy.cpu() if grad_entropy is not None else None
    grad_logprob = grad_logprob.cpu() if grad_logprob is not None else None
    z = logits.detach().cpu().double().requires_grad_(True)
    ent, lp = reference_logprob_entropy(z, targets, temperature, ignore_index)
    loss = 0.0
    if grad_entropy is not None:
        loss = loss + (ent * grad_entropy.double()).sum()
    if grad_logprob is not None:
        loss = loss + (lp * grad_logprob.double()).sum()
    (g,) = torch.autograd.grad(loss, z)
    return g


def reference_pearson(x, y, weight=None) -> float:
    """Pearson correlation of the used pairs, float64 (numpy), NaN where undefined.

    ``x, y``: 1-D arrays of the used pairs only; ``weight``: their weights (> 0) or None.
    Undefined: fewer than two pairs, a constant side (checked exactly, not through a
    rounded variance), or a non-finite value.
    """
    import numpy as np

    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if x.size < 2 or not (np.isfinite(x).all() and np.isfinite(y).all()):
        return float("nan")
    if np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan")
    if weight is None:
        return float(np.corrcoef(x, y)[0, 1])
    cov = np.cov(x, y, aweights=np.asarray(weight, dtype=np.float64))
    return float(np.clip(cov[0, 1] / np.sqrt(cov[0, 0] * cov[1, 1]), -1.0, 1.0))


def reference_spearman(x, y) -> float:
    """Spearman correlation of the used pairs by scipy (ties averaged), NaN where undefined."""
    import numpy as np
    from scipy import stats

    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if x.size < 2 or np.isnan(x).any() or np.isnan(y).any() or (x == x[0]).all() or (y == y[0]).all():
        return float("nan")
    return float(stats.spearmanr(x, y).statistic)
