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
    return check_targets_for(targets, tuple(logits.shape[:-1]), logits.shape[-1], logits.device, ignore_index,
                             check_range, name=name, what="logits")


def check_targets_for(
    targets: object, lead_shape: tuple, vocab: int, device: torch.device, ignore_index: int, check_range: bool,
    *, name: str = "targets", what: str = "logits",
) -> Tensor:
    """Targets for rows of shape ``lead_shape`` over a vocabulary of ``vocab`` columns;
    ``what`` names the tensor whose leading shape the targets must have."""
    if not isinstance(targets, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of token ids, got {type(targets).__name__}")
    if targets.dtype.is_floating_point or targets.dtype.is_complex or targets.dtype == torch.bool:
        raise TypeError(f"{name} must have an integer dtype (int64 or int32), got {targets.dtype}")
    if tuple(targets.shape) != tuple(lead_shape):
        raise ValueError(
            f"{name} must have the leading shape of {what} {tuple(lead_shape)}, got {tuple(targets.shape)}")
    if targets.device != device:
        raise ValueError(f"{name} is on {targets.device} but {what} are on {device}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    if check_range and targets.numel():
        bad = (targets != ignore_index) & ((targets < 0) | (targets >= vocab))
        if bool(bad.any()):
            where = tuple(int(i) for i in bad.nonzero()[0])
            raise ValueError(
                f"{name}{list(where)} = {int(targets[where])} is outside [0, {vocab}) and is not "
                f"ignore_index={ignore_index}")
    return targets


def check_lm_head(hidden: object, weight: object, bias: object) -> None:
    """hidden [..., H], weight [V, H], bias [V] or None: one float dtype, one device."""
    if isinstance(hidden, Tensor) and hidden.dim() >= 1 and hidden.shape[-1] == 0:
        raise ValueError("hidden has an empty hidden dimension (H = 0)")
    check_logits(hidden, "hidden")
    if not isinstance(weight, Tensor):
        raise TypeError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be the LM head's [V, H] matrix, got shape {tuple(weight.shape)}")
    if weight.shape[0] == 0:
        raise ValueError("weight has an empty vocabulary dimension (V = 0)")
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight is [V, H] = {tuple(weight.shape)} but hidden has H = {hidden.shape[-1]}; "
                         f"pass the LM head weight as stored by nn.Linear (out_features x in_features)")
    tensors = {"weight": weight}
    if bias is not None:
        if not isinstance(bias, Tensor):
            raise TypeError(f"bias must be a torch.Tensor or None, got {type(bias).__name__}")
        if tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"bias must have shape [V] = ({weight.shape[0]},), got {tuple(bias.shape)}")
        tensors["bias"] = bias
    for label, t in tensors.items():
        if t.dtype != hidden.dtype:
            raise TypeError(f"{label} is {t.dtype} but hidden is {hidden.dtype}; cast them to one dtype")
        if t.device != hidden.device:
            raise ValueError(f"{label} is on {t.device} but hidden is on {hidden.device}")


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
