"""Ahead-of-time compilation of the kernels for real GPU targets, without a GPU.

The interpreter checks what the kernels compute; this checks that they compile for
sm_80/sm_90 (the interpreter accepts code the compiler rejects), do not spill, keep
16-byte loads on aligned bf16 rows, and round 16-bit gradients to nearest even.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("triton")
try:
    import triton.backends.nvidia  # noqa: F401
except ImportError:  # pragma: no cover - platform without the NVIDIA backend
    pytest.skip("Triton's NVIDIA backend is not installed", allow_module_level=True)


def compile_in_subprocess(calls: str, extra_path: str | None = None) -> list[dict]:
    """Evaluate the report ``calls`` in a process without TRITON_INTERPRET; ``extra_path``
    is put on its sys.path (for kernels written by a test)."""
    code = textwrap.dedent(f"""
        import dataclasses, json, sys
        sys.path[:0] = {[extra_path] if extra_path else []!r}
        from entropy_gpu.kernels.aot import (
            ALL_WANT, compile_report, linear_token_stats_report, segment_comoments_report,
            token_stats_backward_report, token_stats_report)
        reports = [{calls}]
        print(json.dumps([dataclasses.asdict(r) for r in reports]))
    """)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_token_stats_kernel_compiles_for_hopper_and_ampere():
    reports = compile_in_subprocess(
        "token_stats_report(arch=90), token_stats_report(arch=80),"
        "token_stats_report(ALL_WANT, block_v=2048, arch=90),"
        "token_stats_report(partial=True, arch=90),"
        "token_stats_report(dtype='fp32', arch=90)")
    for r in reports:
        assert r["spill_bytes"] == 0, r
        assert r["registers"] is not None and r["registers"] <= 255, r
    default, ampere, all_stats, partial, fp32 = reports
    # Contiguous aligned bf16 rows: 8 bf16 per 16-byte load, none element by element.
    assert default["loads_16B"] >= 1 and default["loads_scalar_16bit"] <= 1, default
    assert fp32["loads_16B"] >= 1, fp32


@pytest.mark.slow
def test_training_kernels_compile_without_spills():
    """The logits-gradient kernel (wide loads and stores) and the GEMM-fused LM head
    (tensor-core MMA, pipelined 16-byte copies) at their default tiles
    (kernels/linear_token_stats.default_tile), in one compiler process."""
    reports = compile_in_subprocess(
        "token_stats_backward_report(arch=90), token_stats_backward_report(arch=80),"
        "token_stats_backward_report(dtype='fp32', arch=90),"
        "linear_token_stats_report(arch=90), linear_token_stats_report(arch=80),"
        "linear_token_stats_report(ALL_WANT, arch=90, has_bias=True),"
        "linear_token_stats_report(dtype='fp32', block_n=32, block_v=64, block_k=32, num_stages=2, arch=80),"
        "linear_token_stats_report(ALL_WANT, dtype='fp32', block_n=32, block_v=64, block_k=32,"
        "                          num_stages=2,"
        "                          arch=90)")
    for r in reports:
        assert r["spill_bytes"] == 0 and r["registers"] is not None, r
    backward, linear = reports[:3], reports[3:]
    for r in backward:  # one read and one write per logit, 16 bytes per thread per access
        assert r["loads_16B"] >= 1 and r["loads_scalar_16bit"] == 0 and r["stores_16B"] >= 1, r
    for r in linear:
        assert r["async_copies_16B"] >= 1, r  # pipelined 16-byte global -> shared copies
    hopper, ampere, all_stats = linear[:3]
    assert hopper["wgmma"] >= 1 and all_stats["wgmma"] >= 1, (hopper, all_stats)  # Hopper tensor cores
    assert ampere["mma_sync"] >= 1, ampere


@pytest.mark.slow
def test_segment_comoments_kernel_compiles_for_hopper_and_ampere():
    """The Pearson segment kernel: compiles, no spills. Its loads stay scalar by design
    (segment ends are arbitrary), so no load-width check."""
    reports = compile_in_subprocess(
        "segment_comoments_report(arch=90), segment_comoments_report(arch=80),"
        "segment_comoments_report(dtype='bf16', weighted=False, arch=90),"
        "segment_comoments_report(dtype='fp64', arch=90)")
    for r in reports:
        assert r["spill_bytes"] == 0, r
        assert r["registers"] is not None and r["registers"] <= 255, r


PROBE_KERNEL = '''
import triton
import triton.language as tl


@triton.jit
def downcast_kernel(src_ptr, dst_ptr, MODE: tl.constexpr, BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK)
    tl.store(dst_ptr + i, tl.load(src_ptr + i).to(dst_ptr.dtype.element_ty, fp_downcast_rounding=MODE))
'''


@pytest.mark.slow
def test_backward_rounds_16bit_gradients_to_nearest_even(tmp_path):
    """The compiled backward writes bf16/fp16 gradients with round-to-nearest-even
    conversions (PTX ``cvt.rn``, SASS ``F2FP`` without a rounding suffix), which the CPU
    tests cannot see: Triton 3.9's interpreter truncates fp32 -> bf16 (docs/numerics.md).
    A probe kernel compiled with ``rtz`` shows that both checks would see another mode."""
    (tmp_path / "rounding_probe.py").write_text(PROBE_KERNEL)
    probe = ("compile_report(__import__('rounding_probe').downcast_kernel, "
             "{'src_ptr': '*fp32', 'dst_ptr': '*bf16'}, {'MODE': 'rtz', 'BLOCK': 256}, [], "
             "arch=90, num_warps=4, sass=True)")
    reports = compile_in_subprocess(
        "token_stats_backward_report(arch=90, sass=True), token_stats_backward_report(arch=80, sass=True),"
        "token_stats_backward_report(dtype='fp16', arch=90, sass=True),"
        "token_stats_backward_report(dtype='bf16', grad_dtype='fp32', arch=90),"
        "token_stats_backward_report(dtype='fp32', arch=90)," + probe,
        extra_path=str(tmp_path))
    bf16_hopper, bf16_ampere, fp16, bf16_to_fp32, fp32, rtz_probe = reports
    for r, kind in ((bf16_hopper, "bf16"), (bf16_ampere, "bf16"), (fp16, "f16")):
        assert r["downcasts"], r  # the gradient is converted in the kernel ...
        # ... to nearest even
        assert all(c.startswith("cvt.rn.") and f".{kind}" in c for c in r["downcasts"]), r
        assert any(c.startswith("F2FP") for c in r["sass_downcasts"]), r
        assert not any(c.endswith((".RZ", ".RM", ".RP")) for c in r["sass_downcasts"]), r
    assert bf16_to_fp32["downcasts"] == [] and fp32["downcasts"] == []  # fp32 gradients: nothing to round
    assert rtz_probe["downcasts"] == ["cvt.rz.bf16.f32"], rtz_probe
    assert any(c.startswith("F2FP") and c.endswith(".RZ") for c in rtz_probe["sass_downcasts"]), rtz_probe
