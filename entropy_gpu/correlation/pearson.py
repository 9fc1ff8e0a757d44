"""Public API: streaming Pearson correlation (SPEC section 3).

``pearson`` (rows of a tensor), ``segment_pearson`` (packed varlen segments, one
Triton launch on GPU) and ``PearsonState`` (mergeable, for datasets and
``torch.distributed``) all reduce pairs to the co-moments of ``comoments.py`` and
finish with the same ``correlation``; NaN and validity rules live there.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from .._validation import check_cu_seqlens, check_dim, check_mask, check_pair, check_weight
from ..backend import resolve_backend, segment_comoments_state_triton
from .comoments import (
    CoMoments,
    Correlation,
    comoments_from_kernel_state,
    comoments_from_unscaled,
    correlation,
    merge_comoments,
    segment_comoments_torch,
)


def check_segments(cu_seqlens: object, total: int, device: torch.device, full: bool) -> int | None:
    """Validate ``cu_seqlens``; return the longest segment, or None when ``full`` is False
    (then only what needs no host sync is checked)."""
    cheap_ok = (isinstance(cu_seqlens, Tensor) and cu_seqlens.dtype in (torch.int32, torch.int64)
                and cu_seqlens.dim() == 1 and cu_seqlens.numel() > 0 and cu_seqlens.device == device)
    if full or not cheap_ok:
        return check_cu_seqlens(cu_seqlens, total, device)  # raises the precise error if any
    return None


def _acc_dtype(x: Tensor, y: Tensor) -> torch.dtype:
    return torch.float64 if torch.float64 in (x.dtype, y.dtype) else torch.float32


def _pair_weight(x: Tensor, mask: Tensor | None, weight: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """One weight per pair (mask folded in), or None when every pair counts once."""
    if mask is not None:
        check_mask(mask, x)
    if weight is not None:
        check_weight(weight, x)
    if weight is None:
        return None if mask is None else mask.to(dtype)
    weight = weight.to(dtype)
    return weight if mask is None else torch.where(mask, weight, 0.0)


def segment_comoments(
    x: Tensor, y: Tensor, weight: Tensor | None, offsets: Tensor, max_length: int | None, backend: str,
) -> CoMoments:
    """Co-moments of the segments of 1-D ``x, y`` (validated) on the resolved ``backend``."""
    if backend == "triton":
        state = segment_comoments_state_triton(x, y, weight, offsets, max_length, _acc_dtype(x, y))
        return comoments_from_kernel_state(state)
    return segment_comoments_torch(x, y, weight, offsets)


def _row_comoments(x: Tensor, y: Tensor, weight: Tensor | None, rows: int, backend: str) -> CoMoments:
    """Co-moments of each of ``rows`` equal-length rows of the (flattened) ``x, y``."""
    length = x.numel() // rows if rows else 0
    offsets = torch.arange(rows + 1, device=x.device, dtype=torch.int64) * length
    flat = (t.reshape(-1) if t is not None else None for t in (x, y, weight))
    return segment_comoments(*flat, offsets, length, backend)


def pearson(
    x: Tensor,
    y: Tensor,
    mask: Tensor | None = None,
    dim: int = -1,
    *,
    weight: Tensor | None = None,
    backend: str = "auto",
) -> Correlation:
    """Pearson correlation of ``x`` and ``y`` along ``dim``, one per row.

    Args:
        x, y: float tensors of the same shape and device.
        mask: bool, shape of ``x``; True = use the pair (e.g. not padding).
        dim: the dimension to correlate along; the others are rows.
        weight: optional finite weights >= 0, shape of ``x`` (weighted correlation);
            a pair with weight 0 is left out whatever its values.
        backend: ``"auto"``, ``"triton"`` or ``"torch"`` (see ``resolve_backend``).

    Returns:
        ``Correlation`` with the shape of ``x`` without ``dim``: ``corr`` (float32,
        float64 for float64 inputs; NaN where undefined), ``valid``, ``n`` (float64).
        Undefined means fewer than two pairs, a zero variance, or a NaN/inf in a used
        pair; it is never an exception and never 0.

    Example:
        >>> import torch, entropy_gpu
        >>> x = torch.randn(3, 100); y = 2 * x + 1
        >>> entropy_gpu.pearson(x, y).corr
        tensor([1., 1., 1.])
    """
    check_pair(x, y)
    d = check_dim(dim, x.dim())
    name = resolve_backend(x.device, backend)
    weight = _pair_weight(x, mask, weight, _acc_dtype(x, y))
    out_shape = x.shape[:d] + x.shape[d + 1:]
    moved = [t.movedim(d, -1) if t is not None else None for t in (x, y, weight)]
    result = correlation(_row_comoments(*moved, out_shape.numel(), name), _acc_dtype(x, y))
    return Correlation(*(t.view(out_shape) for t in result))


def segment_pearson(
    x: Tensor,
    y: Tensor,
    cu_seqlens: Tensor,
    mask: Tensor | None = None,
    *,
    weight: Tensor | None = None,
    backend: str = "auto",
    check_cu_seqlens: bool = True,
) -> Correlation:
    """Pearson correlation of each segment of a packed token stream.

    Segment ``i`` is ``x[cu_seqlens[i]:cu_seqlens[i+1]]`` (the varlen convention of
    flash-attn and padding-free batches); empty segments are allowed and undefined.
    On GPU all segments are reduced by one Triton launch.

    Args:
        x, y: 1-D float tensors of the same length N.
        cu_seqlens: int32/int64 ``[S + 1]``, ``0 = c_0 <= c_1 <= ... <= c_S = N``.
        mask, weight, backend: as in ``pearson``.
        check_cu_seqlens: validate ``cu_seqlens`` (one host sync). With False, invalid
            offsets give meaningless segments but no out-of-bounds access.

    Returns:
        ``Correlation`` of shape ``[S]``.
    """
    check_pair(x, y)
    if x.dim() != 1:
        raise ValueError(f"x and y must be 1-D packed streams, got shape {tuple(x.shape)} "
                         f"(flatten a [1, N] batch with x.view(-1))")
    max_length = check_segments(cu_seqlens, x.numel(), x.device, check_cu_seqlens)
    name = resolve_backend(x.device, backend)
    weight = _pair_weight(x, mask, weight, _acc_dtype(x, y))
    moments = segment_comoments(x, y, weight, cu_seqlens, max_length, name)
    return correlation(moments, _acc_dtype(x, y))


_STATE_KEYS = CoMoments._fields
# The state_dict layout before the scales (raw float64 sums); still loaded.
_LEGACY_STATE_KEYS = ("n", "mean_x", "mean_y", "m2_x", "m2_y", "c_xy")


class PearsonState:
    """Mergeable Pearson state: a dataset-wide (or multi-GPU) correlation in O(1) memory.

    Holds the float64 co-moments of every pair fed so far (``n``, the means, and
    ``M2x, M2y, Cxy`` in units of per-group scales, so that data anywhere in the float64
    range neither overflow nor underflow; docs/correlation.md), for ``shape``
    independent groups (``()``: one correlation).
    Feeding the pairs in any split and merging the states in any order gives the
    one-pass result to rounding (Chan et al.).

    Example:
        >>> import torch, entropy_gpu
        >>> state = entropy_gpu.PearsonState()
        >>> for _ in range(3):
        ...     x = torch.randn(1000); _ = state.update(x, -x + 0.1 * torch.randn(1000))
        >>> bool(state.compute().corr < -0.9)
        True
    """

    def __init__(self, shape: Sequence[int] = (), *, device: torch.device | str | None = None,
                 backend: str = "auto") -> None:
        """``shape``: the groups (``update`` takes ``x`` of shape ``[*shape, ...]``).
        ``device``: where the state lives; by default the device of the first update."""
        self.shape = torch.Size(shape)
        self.backend = backend
        self._device_fixed = device is not None
        self._moments = CoMoments.zeros(self.shape, torch.device(device or "cpu"))
        self._float64 = False  # any float64 input: compute() returns float64

    @property
    def device(self) -> torch.device:
        return self._moments.n.device

    def _adopt_device(self, device: torch.device) -> None:
        if device == self.device:
            return
        if self._device_fixed:
            raise ValueError(f"this PearsonState lives on {self.device}, got data on {device}; "
                             f"create it with PearsonState(device={str(device)!r})")
        self._moments = self._moments.to(device)
        self._device_fixed = True

    def update(self, x: Tensor, y: Tensor, mask: Tensor | None = None, *,
               weight: Tensor | None = None) -> PearsonState:
        """Add the pairs ``(x, y)``: shape ``[*self.shape, ...]``; every element after
        the group dims is a pair of that group. ``mask``/``weight`` as in ``pearson``."""
        check_pair(x, y)
        if x.shape[:len(self.shape)] != self.shape:
            raise ValueError(f"x must have shape [{', '.join(map(str, self.shape))}, ...] (the state's "
                             f"groups, then pairs), got {tuple(x.shape)}")
        self._adopt_device(x.device)
        self._device_fixed = True
        name = resolve_backend(x.device, self.backend)
        weight = _pair_weight(x, mask, weight, _acc_dtype(x, y))
        moments = _row_comoments(x, y, weight, self.shape.numel(), name)
        self._merge_moments(CoMoments(*(t.view(self.shape) for t in moments)))
        self._float64 |= torch.float64 in (x.dtype, y.dtype)
        return self

    def _merge_moments(self, other: CoMoments) -> None:
        self._moments = merge_comoments(self._moments, other.to(self.device))

    def merge(self, other: PearsonState) -> PearsonState:
        """Fold ``other``'s pairs into this state (in place; ``other`` is unchanged)."""
        if not isinstance(other, PearsonState):
            raise TypeError(f"can only merge a PearsonState, got {type(other).__name__}")
        if other.shape != self.shape:
            raise ValueError(f"cannot merge a state of shape {tuple(other.shape)} into one of shape "
                             f"{tuple(self.shape)}")
        self._merge_moments(other._moments)
        self._float64 |= other._float64
        return self

    def all_reduce(self, group: Any = None) -> PearsonState:
        """Merge the states of all ranks of ``group`` (torch.distributed); every rank ends
        with the same state. Gather-and-merge in rank order: stable and deterministic.
        The states of all ranks must have the same shape."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("PearsonState.all_reduce needs torch.distributed.init_process_group() first")
        world = dist.get_world_size(group)
        comm_device = torch.device("cpu")
        if dist.get_backend(group) == "nccl":
            on_gpu = self.device.type == "cuda"
            comm_device = self.device if on_gpu else torch.device("cuda", torch.cuda.current_device())
        # Shapes first, so that a mismatch raises the same error on every rank instead of hanging.
        dims = list(self.shape)[:6]
        shape = torch.tensor([len(self.shape), self.shape.numel(), *dims, *[-1] * (6 - len(dims))],
                             dtype=torch.int64, device=comm_device)
        shapes = [torch.empty_like(shape) for _ in range(world)]
        dist.all_gather(shapes, shape, group=group)
        if any(not torch.equal(s, shapes[0]) for s in shapes):
            raise ValueError(f"PearsonState.all_reduce: ranks hold states of different shapes: "
                             f"{[s.tolist() for s in shapes]}")
        flag = torch.full(self.shape, float(self._float64), dtype=torch.float64, device=self.device)
        packed = torch.stack([*self._moments, flag]).to(comm_device)
        gathered = [torch.empty_like(packed) for _ in range(world)]
        dist.all_gather(gathered, packed, group=group)
        width = len(CoMoments._fields)
        merged = CoMoments(*gathered[0][:width])
        for part in gathered[1:]:
            merged = merge_comoments(merged, CoMoments(*part[:width]))
        self._moments = merged.to(self.device)
        self._float64 = any(bool(part[width].any()) for part in gathered)
        return self

    def compute(self) -> Correlation:
        """The correlation of every pair fed so far (``Correlation`` of shape ``self.shape``)."""
        return correlation(self._moments, torch.float64 if self._float64 else torch.float32)

    def state_dict(self) -> dict[str, Tensor]:
        """The co-moments (float64 tensors of shape ``self.shape``, keys ``CoMoments._fields``:
        ``scaled_m2_x = M2x / scale_x**2`` etc.) and the output-dtype flag."""
        out = {k: v.clone() for k, v in zip(_STATE_KEYS, self._moments)}
        out["float64_output"] = torch.tensor(self._float64)
        return out

    def load_state_dict(self, state_dict: dict[str, Tensor]) -> None:
        """Replace this state by one from ``state_dict()`` (same shape), on this state's device.

        A state_dict saved before the scales were kept (raw ``m2_x, m2_y, c_xy`` keys) still
        loads, with the precision it was saved with.
        """
        if not isinstance(state_dict, dict):
            raise TypeError(f"state_dict must be a dict from PearsonState.state_dict(), "
                            f"got {type(state_dict).__name__}")
        legacy = (not any(k in state_dict for k in ("scale_x", "scale_y"))
                  and all(k in state_dict for k in _LEGACY_STATE_KEYS))
        keys = _LEGACY_STATE_KEYS if legacy else _STATE_KEYS
        missing = [k for k in (*keys, "float64_output") if k not in state_dict]
        if missing:
            raise ValueError(f"state_dict lacks {missing}; expected the keys of PearsonState.state_dict()")
        for k in keys:
            value = state_dict[k]
            if not isinstance(value, Tensor) or value.shape != self.shape:
                raise ValueError(f"state_dict[{k!r}] must be a tensor of shape {tuple(self.shape)}, got "
                                 f"{getattr(value, 'shape', type(value).__name__)}")
        values = [state_dict[k].to(device=self.device, dtype=torch.float64).clone() for k in keys]
        self._moments = comoments_from_unscaled(*values) if legacy else CoMoments(*values)
        self._float64 = bool(state_dict["float64_output"])

    def __repr__(self) -> str:
        n = self._moments.n.sum().item()
        return f"PearsonState(shape={tuple(self.shape)}, device={self.device}, n={n:g})"
