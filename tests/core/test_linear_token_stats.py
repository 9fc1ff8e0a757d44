"""linear_token_stats: statistics of hidden @ weight.T + bias without the logits, on both
backends, against float64 references; gradients w.r.t. hidden, weight and bias; the
peak-memory bound of the torch path."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import entropy_gpu
from entropy_gpu import LINEAR_STAT_NAMES, STAT_NAMES, linear_token_stats, token_stats
from entropy_gpu.kernels.stat_layout import STATE_TARGET_LOGIT
from tests.helpers import TEST_DEVICE, assert_matches, randint
from tests.reference import reference_logprob_entropy, reference_stats

BACKENDS = ["torch", "triton"]


def lm_head(n, h, v, dtype=torch.float32, bias=True, scale=1.0, gen=None):
    hidden = (torch.randn(n, h, dtype=torch.float64, generator=gen) * scale).to(dtype)
    weight = (torch.randn(v, h, dtype=torch.float64, generator=gen) / h**0.5 * 3).to(dtype)
    b = torch.randn(v, dtype=torch.float64, generator=gen).to(dtype) if bias else None
    return hidden.to(TEST_DEVICE), weight.to(TEST_DEVICE), (b.to(TEST_DEVICE) if bias else None)


def reference_logits(hidden, weight, bias):
    """float64 logits on the CPU."""
    z = hidden.cpu().double() @ weight.cpu().double().t()
    return z + bias.cpu().double() if bias is not None else z


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_matches_float64_reference(backend, dtype):
    # V not a multiple of any tile, N = 1, H not a power of two; with and without bias.
    cases = [(1, 24, 37, True, 1.0), (19, 40, 301, False, 0.7), (33, 17, 130, True, 2.0)]
    for n, h, v, bias, temperature in cases:
        hidden, weight, b = lm_head(n, h, v, dtype, bias)
        targets = randint(v, (n,))
        if n > 2:
            targets[2] = -100
        out = linear_token_stats(hidden, weight, targets, b, temperature=temperature, stats="all",
                                 backend=backend)
        ref = reference_stats(reference_logits(hidden, weight, b), targets, temperature)
        assert_matches(out, ref, context=f"{backend} {dtype} N={n} H={h} V={v} bias={bias}")
        norm = hidden.cpu().double().norm(dim=-1)
        torch.testing.assert_close(out.hidden_norm.cpu().double(), norm, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(out.lm_head_grad_norm.cpu().double(), ref["nll_grad_norm"] * norm,
                                   rtol=1e-5,
                                   atol=1e-5)


def test_equals_token_stats_of_the_materialized_logits():
    hidden, weight, bias = lm_head(50, 32, 1000)
    targets = randint(1000, (50,))
    fused = linear_token_stats(hidden, weight, targets, bias, stats="all", temperature=0.9)
    plain = token_stats(hidden @ weight.t() + bias, targets, stats="all", temperature=0.9)
    for name in STAT_NAMES:
        torch.testing.assert_close(getattr(fused, name), getattr(plain, name), atol=2e-5, rtol=1e-5)


def test_tiles_do_not_change_the_result():
    hidden, weight, bias = lm_head(23, 16, 211, scale=4.0)
    targets = randint(211, (23,))
    ref = reference_stats(reference_logits(hidden, weight, bias), targets, 0.8)
    for tile in [(1, 211), (3, 7), (5, 64), (23, 1), (1000, 1000)]:
        out = linear_token_stats(hidden, weight, targets, bias, temperature=0.8, stats="all", backend="torch",
                                 tile=tile)
        assert_matches(out, ref, context=f"tile={tile}")


@pytest.mark.parametrize("block_v,num_splits", [(16, 1), (16, 5), (32, 3)])
def test_triton_kernel_splits_and_blocks(block_v, num_splits):
    from entropy_gpu.kernels.linear_token_stats import launch_linear_token_moments
    from entropy_gpu.moments import finalize, reduce_moments, unpack_moments

    hidden, weight, bias = lm_head(20, 24, 150, torch.float32, scale=3.0)
    targets = randint(150, (20,))
    state, split_size = launch_linear_token_moments(
        hidden, weight, bias, targets, inv_temperature=1.0, ignore_index=-1, need=(True, True, True, True),
        block_n=16, block_v=block_v, block_k=16, num_splits=num_splits)
    assert state.shape[1] == -(-150 // split_size)
    mom = reduce_moments(unpack_moments(state), 1, 1.0)
    z_target = state[..., STATE_TARGET_LOGIT].gather(1, (targets // split_size)[:, None]).squeeze(1)
    in_range = torch.ones(20, dtype=torch.bool, device=TEST_DEVICE)
    stats = finalize(mom, z_target, in_range, ~in_range, 1.0, (True,) * len(STAT_NAMES))
    ref = reference_stats(reference_logits(hidden, weight, bias), targets)
    assert_matches(entropy_gpu.TokenStats(*stats), ref)


@pytest.mark.parametrize("backend", BACKENDS)
def test_leading_dims_strides_and_empty(backend):
    hidden, weight, bias = lm_head(2 * 7 * 2, 24, 99)
    hidden3 = hidden.view(2, 7, 48)[..., ::2]  # [2, 7, 24], strided
    weight_t = weight.t().contiguous().t()     # column-major [V, H]
    targets = randint(99, (2, 7))
    out = linear_token_stats(hidden3, weight_t, targets, bias, stats="all", backend=backend)
    ref = reference_stats(reference_logits(hidden3, weight, bias), targets)
    assert out.entropy.shape == (2, 7)
    assert_matches(out, ref)
    empty = linear_token_stats(hidden[:0], weight, targets.view(-1)[:0], bias, backend=backend)
    assert empty.entropy.shape == (0,) and empty.logprob.shape == (0,)


def test_stats_selection_and_validation():
    hidden, weight, bias = lm_head(4, 8, 20)
    targets = randint(20, (4,))
    out = linear_token_stats(hidden, weight)
    assert out.entropy is not None and out.logprob is None and out.hidden_norm is None
    out = linear_token_stats(hidden, weight, targets, stats=("lm_head_grad_norm",))
    assert out.lm_head_grad_norm is not None and out.nll_grad_norm is None
    everything = linear_token_stats(hidden, weight, targets, stats="all")
    assert sum(f is not None for f in everything) == len(LINEAR_STAT_NAMES)
    with pytest.raises(ValueError, match="need targets"):
        linear_token_stats(hidden, weight, stats=("lm_head_grad_norm",))
    with pytest.raises(ValueError, match="unknown"):
        linear_token_stats(hidden, weight, stats=("hidden",))
    with pytest.raises(ValueError, match=r"\[V, H\]"):
        linear_token_stats(hidden, weight.t())
    with pytest.raises(ValueError, match="matrix"):
        linear_token_stats(hidden, weight[0])
    with pytest.raises(TypeError, match="dtype"):
        linear_token_stats(hidden, weight.double())
    with pytest.raises(ValueError, match="bias"):
        linear_token_stats(hidden, weight, bias=bias[:5])
    with pytest.raises(TypeError, match="bias"):
        linear_token_stats(hidden, weight, bias=bias.half())
    with pytest.raises(ValueError, match="H = 0"):
        linear_token_stats(hidden[:, :0], weight[:, :0])
    with pytest.raises(ValueError, match="outside"):
        linear_token_stats(hidden, weight, torch.tensor([0, 1, 2, 20], device=TEST_DEVICE))
    with pytest.raises(ValueError, match="leading shape of hidden"):
        linear_token_stats(hidden, weight, targets[:3])
    with pytest.raises(ValueError, match="tile"):
        linear_token_stats(hidden, weight, tile=(0, 4))
    with pytest.raises(ValueError, match="float64"):
        linear_token_stats(hidden.double(), weight.double(), backend="triton")
    with pytest.raises(ValueError, match="temperature"):
        linear_token_stats(hidden, weight, temperature=0.0)


def test_gradcheck_float64_torch_backend():
    hidden, weight, bias = lm_head(5, 6, 13, torch.float64)
    targets = torch.tensor([0, 12, -100, 4, 4], device=TEST_DEVICE)
    args = [x.clone().requires_grad_(True) for x in (hidden, weight, bias)]

    def f(h, w, b):
        out = linear_token_stats(h, w, targets, b, temperature=0.7, stats=("entropy", "logprob",
                                                                           "hidden_norm"),
                                 backend="torch", tile=(2, 5))
        return out.entropy, out.logprob
    assert torch.autograd.gradcheck(f, args)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grads_match_float64_autograd(backend, dtype):
    hidden, weight, bias = lm_head(21, 24, 150, dtype, scale=2.0)
    targets = randint(150, (21,))
    targets[::4] = -100
    ge, gl = torch.randn(21, device=TEST_DEVICE), torch.randn(21, device=TEST_DEVICE)
    args = [x.cpu().double().requires_grad_(True) for x in (hidden, weight, bias)]
    ent, lp = reference_logprob_entropy(reference_logits(*args), targets.cpu(), 0.8)
    ge64, gl64 = ge.cpu().double(), gl.cpu().double()
    want = torch.autograd.grad((ent * ge64).sum() + (lp * gl64).sum(), args)
    args = [x.clone().requires_grad_(True) for x in (hidden, weight, bias)]
    out = linear_token_stats(*args[:2], targets, args[2], temperature=0.8, stats=("entropy", "logprob"),
                             backend=backend, tile=(8, 64))
    got = torch.autograd.grad((out.entropy * ge).sum() + (out.logprob * gl).sum(), args)
    rtol = 1e-5 if dtype == torch.float32 else 8e-3
    for name, g, w in zip(("hidden", "weight", "bias"), got, want):
        assert g.dtype == dtype
        torch.testing.assert_close(g.cpu().double(), w, atol=1e-5, rtol=rtol,
                                   msg=lambda m, name=name: f"{name}: {m}")


def test_grads_only_where_asked_and_fields_marked():
    hidden, weight, bias = lm_head(6, 8, 40)
    hidden.requires_grad_(True)
    out = linear_token_stats(hidden, weight, randint(40, (6,)), bias, stats="all")
    for name in LINEAR_STAT_NAMES:
        assert getattr(out, name).requires_grad == (name in ("entropy", "logprob")), name
    (g,) = torch.autograd.grad(out.entropy.sum(), hidden)
    assert g.shape == hidden.shape and weight.grad is None
    with pytest.raises(RuntimeError):
        out.lm_head_grad_norm.sum().backward()


def test_lm_head_grad_norm_is_the_weight_gradient_norm():
    """Definition check: ||d(-log p_y)/dW||_F (bias included in the logits) per token,
    by autograd in float64, one token at a time."""
    hidden, weight, bias = lm_head(4, 10, 30, torch.float64)
    targets = randint(30, (4,))
    out = linear_token_stats(hidden, weight, targets, bias, temperature=0.6, stats=("lm_head_grad_norm",))
    for i in range(4):
        w = weight.clone().requires_grad_(True)
        nll = -torch.log_softmax((hidden[i] @ w.t() + bias) / 0.6, -1)[targets[i]]
        (g,) = torch.autograd.grad(nll, w)
        torch.testing.assert_close(out.lm_head_grad_norm[i], g.norm(), rtol=1e-10, atol=1e-12)


PEAK_CHILD = textwrap.dedent("""
    import json, sys, torch
    import entropy_gpu
    from entropy_gpu.bench.suite import rss_growth_mib

    torch.set_num_threads(1)
    n, h, v, modes = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4:]
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(n, h, generator=gen).requires_grad_(True)
    weight = (torch.randn(v, h, generator=gen) / h ** 0.5).requires_grad_(True)
    targets = torch.randint(0, v, (n,), generator=gen)

    def step(mode):
        if mode == "fused":
            out = entropy_gpu.linear_token_stats(hidden, weight, targets, stats=("entropy", "logprob"),
                                                 backend="torch")
            ent, lp = out.entropy, out.logprob
        else:
            ent, lp = entropy_gpu.entropy_and_logprobs(hidden @ weight.t(), targets, backend="torch")
        (ent.sum() - lp.sum()).backward()
        hidden.grad = weight.grad = None

    # Warm-up on a small slice: thread pools, allocator arenas and lazy imports.
    small = (hidden[:8].detach().requires_grad_(True), weight[:300].detach().requires_grad_(True))
    warm = entropy_gpu.linear_token_stats(small[0], small[1], targets[:8] % 300, stats=("entropy", "logprob"))
    warm.entropy.sum().backward()
    # In order: memory the first run leaves cached can only hide the later runs' growth.
    print(json.dumps({mode: rss_growth_mib(lambda: step(mode)) for mode in modes}))
""")


def peak_extra_mib(n, h, v, *modes):
    """Peak resident-memory growth (MiB) of one forward + backward per mode, in a fresh process."""
    # A fixed glibc mmap threshold: freed large blocks go back to the OS, so the
    # high-water mark is that of live allocations. With the default adaptive threshold,
    # heap fragmentation added 0-20 MiB, varying from run to run with address-space layout.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    proc = subprocess.run([sys.executable, "-c", PEAK_CHILD, str(n), str(h), str(v), *modes],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"),
                    reason="resident-memory high-water mark is Linux-only")
def test_peak_memory_is_bounded_by_the_tile_not_n_times_v():
    """Forward + backward on the torch path. The fused head's extra resident memory is a
    few 4 MiB tiles plus the [N, H] and [V, H] gradients (~28 MiB measured, whatever
    N x V); the materialized path needs the [N, V] logits and their gradient. The bound,
    a fifth of one fp32 [N, V] tensor, is below any single [N, V] tensor even in bf16.
    The materialized run shows that the probe does see an N x V allocation."""
    n, h, v = 2048, 16, 32768
    logits_mib = n * v * 4 / 2**20  # 256 MiB
    peaks = peak_extra_mib(n, h, v, "fused", "materialized")
    assert peaks["materialized"] > logits_mib, peaks
    assert peaks["fused"] < 0.2 * logits_mib, peaks
