"""The row layout every core operation reads logits in, at the bottom of the core (it imports
nothing of ``entropy_gpu``): ``as_rows`` views logits ``[..., V]`` as ``[outer, inner, V]``
rows, and ``accumulation_dtype`` is the dtype their statistics are accumulated and returned in.
"""

from __future__ import annotations

import torch
from torch import Tensor


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype statistics are accumulated and returned in: float64 for float64 input, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def as_rows(x: Tensor) -> Tensor:
    """View ``x`` [..., V] as [outer, inner, V] without copying where strides allow.

    Leading dimensions merge while their strides chain (size-1 dims are dropped), so
    contiguous tensors, row slices and ``logits[:, :-1]`` all stay views. More than two
    unmergeable leading dimensions fall back to a copy.
    """
    vocab = x.shape[-1]
    dims: list[list[int]] = []  # [size, stride], outermost first
    for size, stride in zip(x.shape[:-1], x.stride()[:-1]):
        if size == 1:
            continue
        if dims and dims[-1][1] == stride * size:
            dims[-1] = [dims[-1][0] * size, stride]
        else:
            dims.append([size, stride])
    if len(dims) > 2:
        return as_rows(x.contiguous())
    while len(dims) < 2:
        dims.insert(0, [1, 0])
    (outer, s_outer), (inner, s_inner) = dims
    return x.as_strided((outer, inner, vocab), (s_outer, s_inner, x.stride(-1)))
