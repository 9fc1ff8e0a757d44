"""Token trees: many continuations of one trace evaluated in one forward pass.

The prompt and trace form a chain; each answer probe branches off the trace at a
step boundary, each answer candidate or sampled answer branches off its probe.
``PackedRunner`` evaluates every node in one forward pass: a node attends to itself
and its ancestors only (a block attention mask) and sits at position = depth, so its
logits equal those of re-encoding its root-to-node path from scratch. New nodes added
later (sampled answer tokens) reuse the KV cache of the nodes already evaluated.
``NaiveRunner`` does that re-encoding, one forward per path: the reference for tests
and benchmarks.
"""

from __future__ import annotations

import inspect

import torch
from torch import Tensor

MASKABLE_ATTENTION = ("sdpa", "eager")


class TokenTree:
    """Tokens with parent pointers; ``ancestors[i, j]`` is True when node ``j`` is node
    ``i`` or one of its ancestors. Nodes are appended, parents always before children."""

    def __init__(self) -> None:
        self.tokens: list[int] = []
        self.parents: list[int] = []
        self.depths: list[int] = []
        self._ancestors = torch.zeros(0, 0, dtype=torch.bool)

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def ancestors(self) -> Tensor:
        n = len(self)
        return self._ancestors[:n, :n]

    def extend(self, token_ids: list[int], parent: int = -1) -> list[int]:
        """Append ``token_ids`` as a chain below node ``parent`` (-1: a new root);
        returns the new node indices."""
        if not -1 <= parent < len(self):
            raise IndexError(f"parent {parent} is not a node of this tree ({len(self)} nodes)")
        start, m = len(self), len(token_ids)
        if m == 0:
            return []
        if start + m > self._ancestors.shape[0]:
            cap = max(2 * self._ancestors.shape[0], start + m, 64)
            grown = torch.zeros(cap, cap, dtype=torch.bool)
            grown[:start, :start] = self.ancestors
            self._ancestors = grown
        rows = self._ancestors[start:start + m]
        if parent >= 0:
            rows[:, :start] = self._ancestors[parent, :start]
        rows[:, start:start + m] = torch.ones(m, m, dtype=torch.bool).tril()
        base = self.depths[parent] + 1 if parent >= 0 else 0
        self.tokens += [int(t) for t in token_ids]
        self.parents += [parent] + list(range(start, start + m - 1))
        self.depths += list(range(base, base + m))
        return list(range(start, start + m))

    def path(self, node: int) -> list[int]:
        """Node indices from the root down to ``node``."""
        return torch.nonzero(self._ancestors[node, :node + 1]).flatten().tolist()


def _accepts_logits_to_keep(model) -> bool:
    return "logits_to_keep" in inspect.signature(model.forward).parameters


def _cache_argument(model) -> str:
    """The keyword the model takes for its KV cache: ``cache`` in current transformers,
    ``past_key_values`` (deprecated there, removed in 5.40) in older releases."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _forward_logits(model, ids: Tensor, keep: Tensor, **kwargs):
    """Logits [len(keep), V] at positions ``keep``; only those go through the LM head
    when the model supports ``logits_to_keep``."""
    if _accepts_logits_to_keep(model):
        out = model(input_ids=ids[None], logits_to_keep=keep, **kwargs)
        return out.logits[0], out
    out = model(input_ids=ids[None], **kwargs)
    return out.logits[0, keep], out


class PackedRunner:
    """Evaluates a growing tree: each ``logits`` call runs one forward pass over the
    nodes added since the previous call, attending to the cached ones."""

    def __init__(self, model) -> None:
        impl = getattr(model.config, "_attn_implementation", None)
        if impl not in MASKABLE_ATTENTION:
            raise ValueError(
                f"packed SIA needs an attention implementation that takes an arbitrary mask "
                f"({' or '.join(MASKABLE_ATTENTION)}), this model uses {impl!r}: load it with "
                f"attn_implementation='sdpa', or use method='naive'")
        self.model = model
        self.cache = None
        self.cache_argument = _cache_argument(model)
        self.done = 0
        self.tokens_processed = 0
        self.forward_calls = 0

    @torch.no_grad()
    def logits(self, tree: TokenTree, nodes: list[int]) -> Tensor:
        """Logits [len(nodes), V] of ``nodes``, which must be among the new nodes."""
        start, end = self.done, len(tree)
        if not nodes:
            return torch.empty(0)
        if min(nodes) < start:
            raise ValueError("PackedRunner returns logits of new nodes only")
        device = next(self.model.parameters()).device
        dtype = next(self.model.parameters()).dtype
        allowed = tree.ancestors[start:end, :end].to(device)
        mask = torch.zeros(1, 1, end - start, end, dtype=dtype, device=device)
        mask.masked_fill_(~allowed, torch.finfo(dtype).min)
        ids = torch.tensor(tree.tokens[start:end], device=device)
        positions = torch.tensor(tree.depths[start:end], device=device)[None]
        keep = torch.tensor(nodes, device=device) - start
        logits, out = _forward_logits(self.model, ids, keep, attention_mask=mask, position_ids=positions,
                                      use_cache=True, **{self.cache_argument: self.cache})
        self.cache = getattr(out, self.cache_argument)
        self.done = end
        self.tokens_processed += end - start
        self.forward_calls += 1
        return logits


class NaiveRunner:
    """Re-encodes the root-to-node path of every requested node from scratch (one
    forward per distinct path, no cache): the reference for ``PackedRunner``."""

    def __init__(self, model) -> None:
        self.model = model
        self.tokens_processed = 0
        self.forward_calls = 0

    @torch.no_grad()
    def logits(self, tree: TokenTree, nodes: list[int]) -> Tensor:
        device = next(self.model.parameters()).device
        rows: dict[int, Tensor] = {}
        requested = set(nodes)
        # Deepest first: one path serves every requested node on it.
        for node in sorted(requested, key=lambda i: -tree.depths[i]):
            if node in rows:
                continue
            path = tree.path(node)
            wanted = [i for i in path if i in requested and i not in rows]
            position = {n: p for p, n in enumerate(path)}
            keep = torch.tensor([position[i] for i in wanted], device=device)
            ids = torch.tensor([tree.tokens[i] for i in path], device=device)
            logits, _ = _forward_logits(self.model, ids, keep, use_cache=False)
            rows.update(zip(wanted, logits))
            self.tokens_processed += len(path)
            self.forward_calls += 1
        return torch.stack([rows[i] for i in nodes])
