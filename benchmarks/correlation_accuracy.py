"""Accuracy of the Pearson paths on data with mean 1e6 and unit variance, against a
float64/long-double reference on the same rounded inputs. Prints a table.

    TRITON_INTERPRET=1 .venv/bin/python benchmarks/correlation_accuracy.py

The Triton kernel runs under the interpreter on CPU tensors (same arithmetic and
dtypes as on GPU, but numpy does the float32 operations; no FMA contraction).
"""

from __future__ import annotations

import numpy as np
import torch

import entropy_gpu
from entropy_gpu import PearsonState, pearson
from entropy_gpu.correlation.comoments import correlation
from entropy_gpu.correlation.pearson import _row_comoments


def reference(x: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    """Per-row correlation in long double: shift by the first value (exact for these
    data), then two-pass."""
    out = []
    for xr, yr in zip(x.double().numpy(), y.double().numpy()):
        a = (xr - xr[0]).astype(np.longdouble)
        b = (yr - yr[0]).astype(np.longdouble)
        a -= a.mean()
        b -= b.mean()
        out.append(float((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum())))
    return np.array(out)


def naive_one_pass(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    n = x.shape[-1]
    sx, sy = x.sum(-1), y.sum(-1)
    num = n * (x * y).sum(-1) - sx * sy
    return num / torch.sqrt((n * (x * x).sum(-1) - sx * sx) * (n * (y * y).sum(-1) - sy * sy))


def data(rows: int, length: int, dtype: torch.dtype, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    rho = torch.linspace(-0.99, 0.99, rows, dtype=torch.float64).unsqueeze(1)
    x = torch.randn(rows, length, dtype=torch.float64, generator=gen)
    y = rho * x + torch.sqrt(1 - rho * rho) * torch.randn(rows, length, dtype=torch.float64, generator=gen)
    return (x + 1e6).to(dtype), (y + 1e6).to(dtype)


def row(label: str, got, want: np.ndarray, unrounded=None) -> None:
    """Error of the returned correlation, and of the same value before the final cast
    to the output dtype (float32 output rounding alone is up to 3e-8)."""
    err = np.abs(np.asarray(got, dtype=np.float64).reshape(-1) - want)
    inner = "" if unrounded is None else f"{np.nanmax(np.abs(np.asarray(unrounded).reshape(-1) - want)):.2e}"
    print(f"| {label} | {np.nanmax(err):.2e} | {inner} | {np.isnan(err).sum()} |")


def unrounded_pearson(x: torch.Tensor, y: torch.Tensor, backend: str) -> torch.Tensor:
    return correlation(_row_comoments(x, y, None, x.shape[0], backend), torch.float64).corr


def main() -> None:
    torch.manual_seed(0)
    print("| case (mean 1e6, std 1) | max abs error | before output cast | NaN |")
    print("|---|---|---|---|")
    for dtype in (torch.float32, torch.float64):
        name = str(dtype).split(".")[-1]
        x, y = data(64, 4096, dtype)
        want = reference(x, y)
        row(f"{name} 64 x 4096, naive one-pass sums ({name})", naive_one_pass(x, y), want)
        for backend in ("torch", "triton"):
            row(f"{name} 64 x 4096, pearson backend={backend}", pearson(x, y, backend=backend).corr, want,
                unrounded_pearson(x, y, backend))
        xl, yl = data(1, 1_000_000, dtype, seed=1)
        want_l = reference(xl, yl)
        for backend in ("torch", "triton"):
            row(f"{name} 1 x 1e6, pearson backend={backend}", pearson(xl, yl, backend=backend).corr, want_l,
                unrounded_pearson(xl, yl, backend))
        for backend in ("torch", "triton"):
            state = PearsonState(backend=backend)
            for chunk in torch.randperm(100):
                sl = slice(int(chunk) * 10_000, (int(chunk) + 1) * 10_000)
                state.update(xl[:, sl], yl[:, sl])
            row(f"{name} 1 x 1e6, PearsonState, 100 chunks in random order, backend={backend}",
                state.compute().corr, want_l, correlation(state._moments, torch.float64).corr)
    print(f"\nentropy_gpu {entropy_gpu.__version__}, torch {torch.__version__}")


if __name__ == "__main__":
    main()
