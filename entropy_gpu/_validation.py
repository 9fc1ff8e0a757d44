"""Input checks shared by the public API. Errors say what was wrong and how to fix it."""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_logits(logits: object, name: str = "logits") -> Tensor:
    if not isinstance(logits, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(logits).__name__}")
    if logits.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {logits.dtype}")
    if logits.dim() < 1:
        raise ValueError(f"{name} must have shape [..., V], got a 0-d tensor")
    if logits.shape[-1] == 0:
        raise ValueError(f"{name} has an empty vocabulary dimension (V = 0)")
    return logits


def check_temperature(temperature: object) -> float:
    if isinstance(temperature, Tensor):
        if temperature.numel() != 1:
            raise ValueError(f"temperature must be a scalar, got a tensor of shape {tuple(temperature.shape)}")
        temperature = temperature.item()
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real):
        raise TypeError(f"temperature must be a positive real number, got {type(temperature).__name__}")
    t = float(temperature)
    if not math.isfinite(t) or t <= 0.0:
        raise ValueError(f"temperature must be finite and > 0, got {temperature}")
    return t


def check_targets(
    targets: object, logits: Tensor, ignore_index: int, check_range: bool, name: str = "targets"
) -> Tensor:
    if not isinstance(targets, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of token ids, got {type(targets).__name__}")
    if targets.dtype.is_floating_point or targets.dtype.is_complex or targets.dtype == torch.bool:
        raise TypeError(f"{name} must have an integer dtype (int64 or int32), got {targets.dtype}")
    if tuple(targets.shape) != tuple(logits.shape[:-1]):
        raise ValueError(
            f"{name} must have the leading shape of logits {tuple(logits.shape[:-1])}, got {tuple(targets.shape)}")
    if targets.device != logits.device:
        raise ValueError(f"{name} is on {targets.device} but logits are on {logits.device}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    if check_range and targets.numel():
        vocab = logits.shape[-1]
        bad = (targets != ignore_index) & ((targets < 0) | (targets >= vocab))
        if bool(bad.any()):
            where = tuple(int(i) for i in bad.nonzero()[0])
            raise ValueError(
                f"{name}{list(where)} = {int(targets[where])} is outside [0, {vocab}) and is not "
                f"ignore_index={ignore_index}")
    return targets


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
