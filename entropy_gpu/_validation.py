"""Input checks shared by the public API, and its one entry path.

Every public entry point that reads logits (``token_stats``, ``linear_token_stats``,
``vocab_parallel_token_stats``, ``token_stats_with_correlation``) starts with
``plan_call``: it validates the common arguments, resolves the ``stats`` names and
picks the backend. Errors say what was wrong and how to fix it.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable
from typing import NamedTuple

import torch
from torch import Tensor

from .backend import resolve_backend
from .moments import DEFAULT_STATS, STAT_NAMES, TARGET_STATS

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
TARGET_DTYPES = (torch.int64, torch.int32)


class CallPlan(NamedTuple):
    """What a validated call computes and where."""

    inv_temperature: float       #: 1 / temperature
    want: tuple[bool, ...]       #: one flag per statistic name, in the names' order
    backend: str                 #: "triton" or "torch"


def resolve_stats(stats: str | Iterable[str] | None, has_targets: bool, names: tuple[str, ...] = STAT_NAMES,
                  defaults: tuple[str, ...] = DEFAULT_STATS,
                  target_names: frozenset[str] = TARGET_STATS) -> tuple[bool, ...]:
    """Flags (in ``names`` order) for the requested statistics; target-dependent ones
    are dropped from ``None``/``"all"`` without targets and refused when named."""
    if stats is None:
        chosen = [s for s in defaults if has_targets or s not in target_names]
    elif stats == "all":
        chosen = [s for s in names if has_targets or s not in target_names]
    else:
        if not isinstance(stats, (str, Iterable)):
            raise TypeError(f"stats must be a statistic name, a list of names, 'all' or None, got {stats!r}")
        chosen = [stats] if isinstance(stats, str) else list(stats)
        unknown = [s for s in chosen if s not in names]
        if unknown:
            raise ValueError(f"unknown statistic(s) {unknown}; choose from {names} or 'all'")
        if not chosen:
            raise ValueError("stats is empty: request at least one statistic")
        missing = [s for s in chosen if s in target_names]
        if missing and not has_targets:
            raise ValueError(f"{missing} need targets: pass targets=...")
    return tuple(s in chosen for s in names)


def plan_call(
    *, device: torch.device, lead_shape: tuple, vocab: int, targets: object, temperature: object,
    ignore_index: object, stats: str | Iterable[str] | None, backend: str, check_targets_range: bool,
    names: tuple[str, ...] = STAT_NAMES, defaults: tuple[str, ...] = DEFAULT_STATS,
    target_names: frozenset[str] = TARGET_STATS, what: str = "logits",
) -> CallPlan:
    """The shared entry path of the public API, after the caller checked its main tensor
    (``what``: rows of shape ``lead_shape`` over ``vocab`` columns on ``device``):
    temperature, targets (range checked when ``check_targets_range``), stats names, backend."""
    t = check_temperature(temperature)
    if targets is not None:
        check_targets_for(targets, tuple(lead_shape), vocab, device, ignore_index, check_targets_range,
                          what=what)
    elif isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    want = resolve_stats(stats, targets is not None, names, defaults, target_names)
    return CallPlan(1.0 / t, want, resolve_backend(device, backend))


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
            raise ValueError(f"temperature must be a scalar, got a tensor of shape "
                             f"{tuple(temperature.shape)}")
        temperature = temperature.item()
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real):
        raise TypeError(f"temperature must be a positive real number, got {type(temperature).__name__}")
    t = float(temperature)
    # Comparisons, not math.isfinite: torch.compile(dynamic=True) traces t as a symbolic
    # float, which math.isfinite does not take. NaN fails both comparisons.
    if not 0.0 < t < math.inf:
        raise ValueError(f"temperature must be finite and > 0, got {temperature}")
    return t


def check_targets(
    targets: object, logits: Tensor, ignore_index: int, check_range: bool, name: str = "targets"
) -> Tensor:
    return check_targets_for(targets, tuple(logits.shape[:-1]), logits.shape[-1], logits.device, ignore_index,
                             check_range, name=name, what="logits")


def check_targets_for(
    targets: object,
    lead_shape: tuple,
    vocab: int,
    device: torch.device,
    ignore_index: int,
    check_range: bool,
    *,
    name: str = "targets",
    what: str = "logits",
) -> Tensor:
    """Targets for rows of shape ``lead_shape`` over a vocabulary of ``vocab`` columns;
    ``what`` names the tensor whose leading shape the targets must have."""
    if not isinstance(targets, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of token ids, got {type(targets).__name__}")
    if targets.dtype not in TARGET_DTYPES:
        # Narrower or unsigned integers would wrap ignore_index (-100) and large token ids.
        raise TypeError(f"{name} must have dtype int64 or int32 (token ids), got {targets.dtype}; "
                        f"convert with {name}.long()")
    if tuple(targets.shape) != tuple(lead_shape):
        raise ValueError(
            f"{name} must have the leading shape of {what} {tuple(lead_shape)}, got {tuple(targets.shape)}")
    if targets.device != device:
        raise ValueError(f"{name} is on {targets.device} but {what} are on {device}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    # Under torch.compile the check would be a host sync (a graph break): out-of-range
    # targets then give NaN rows, as with check_range=False (docs/numerics.md, "Behaving like a torch op").
    if check_range and targets.numel() and not torch.compiler.is_compiling():
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


def check_pair(x: object, y: object, names: tuple[str, str] = ("x", "y")) -> tuple[Tensor, Tensor]:
    """Two float tensors of one shape on one device (the pairs of a correlation)."""
    for value, name in zip((x, y), names):
        if not isinstance(value, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
        if value.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {value.dtype} "
                            f"(convert with {name}.float())")
    if x.shape != y.shape:
        raise ValueError(f"{names[0]} and {names[1]} must have the same shape, got {tuple(x.shape)} "
                         f"and {tuple(y.shape)}")
    if x.device != y.device:
        raise ValueError(f"{names[0]} is on {x.device} but {names[1]} is on {y.device}")
    return x, y


def check_mask(mask: object, like: Tensor, name: str = "mask") -> Tensor:
    """A bool tensor of ``like``'s shape and device (True = use the pair)."""
    if not isinstance(mask, Tensor):
        raise TypeError(f"{name} must be a bool torch.Tensor, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(f"{name} must have dtype torch.bool (True = use the pair), got {mask.dtype}; "
                        f"pass {name}.bool() or weights through weight=")
    if mask.shape != like.shape:
        raise ValueError(f"{name} must have shape {tuple(like.shape)}, got {tuple(mask.shape)}")
    if mask.device != like.device:
        raise ValueError(f"{name} is on {mask.device} but the data are on {like.device}")
    return mask


def check_weight(weight: object, like: Tensor, name: str = "weight") -> Tensor:
    """Finite non-negative float weights of ``like``'s shape and device (one host sync)."""
    if not isinstance(weight, Tensor):
        raise TypeError(f"{name} must be a float torch.Tensor, got {type(weight).__name__}")
    if weight.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must have a float dtype, got {weight.dtype}")
    if weight.shape != like.shape:
        raise ValueError(f"{name} must have shape {tuple(like.shape)}, got {tuple(weight.shape)}")
    if weight.device != like.device:
        raise ValueError(f"{name} is on {weight.device} but the data are on {like.device}")
    if weight.numel() and not bool((torch.isfinite(weight) & (weight >= 0)).all()):
        raise ValueError(f"{name} must be finite and >= 0 (use 0 to leave a pair out)")
    return weight


def check_dim(dim: object, ndim: int, name: str = "dim") -> int:
    if isinstance(dim, bool) or not isinstance(dim, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(dim).__name__}")
    if ndim == 0:
        raise ValueError("x and y must have at least one dimension, got 0-d tensors")
    if not -ndim <= dim < ndim:
        raise ValueError(f"{name}={dim} is out of range for tensors with {ndim} dimension(s)")
    return int(dim) % ndim


def check_cu_seqlens(cu_seqlens: object, total: int, device: torch.device, name: str = "cu_seqlens") -> int:
    """Validate packed-sequence offsets ``[0, ..., total]``; return the longest segment (one host sync)."""
    if not isinstance(cu_seqlens, Tensor):
        raise TypeError(f"{name} must be an int32/int64 torch.Tensor, got {type(cu_seqlens).__name__}")
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{name} must have dtype int32 or int64, got {cu_seqlens.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() == 0:
        raise ValueError(f"{name} must be 1-D with S + 1 >= 1 entries, got shape {tuple(cu_seqlens.shape)}")
    if cu_seqlens.device != device:
        raise ValueError(f"{name} is on {cu_seqlens.device} but the data are on {device}")
    offsets = cu_seqlens.tolist()
    if offsets[0] != 0 or offsets[-1] != total:
        raise ValueError(f"{name} must start at 0 and end at the number of tokens ({total}), got "
                         f"{offsets[0]} ... {offsets[-1]}")
    lengths = [b - a for a, b in zip(offsets, offsets[1:])]
    if lengths and min(lengths) < 0:
        raise ValueError(f"{name} must be non-decreasing (segment i is [{name}[i], {name}[i+1]))")
    return max(lengths, default=0)
