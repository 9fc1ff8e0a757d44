"""Compile a kernel ahead of time for a CUDA target, no GPU needed, and read the
compiler's resource report: registers, spills, and how wide the global loads are.

This is how kernel changes are checked on machines without a GPU (CI included):
a kernel that fails to compile for sm_90, spills, loses its 16-byte loads, or
rounds its 16-bit outputs other than to nearest even shows up here. Requires
Triton's NVIDIA backend (bundled with Linux wheels) and must run in a process where
TRITON_INTERPRET is not set.
"""

from __future__ import annotations

import contextlib
import io
import re
import shutil
import tempfile
from dataclasses import dataclass

from .stat_layout import STAT_NAMES

# The statistics the public API computes by default with targets (want flags, STAT_NAMES order).
DEFAULT_WANT = tuple(name in ("logsumexp", "entropy", "logprob", "nll_grad_norm") for name in STAT_NAMES)
ALL_WANT = (True,) * len(STAT_NAMES)


@dataclass(frozen=True)
class KernelReport:
    arch: int
    num_warps: int
    registers: int | None
    spill_bytes: int | None
    loads_16B: int   # ld.global.v4 (16 bytes per thread for 32-bit lanes)
    loads_8B: int
    loads_scalar_16bit: int
    stores_16B: int = 0   # st.global.v4
    stores_8B: int = 0    # st.global.v2 (16-bit outputs: 8 bytes when 4 lanes per thread)
    num_stages: int | None = None
    async_copies_16B: int = 0  # cp.async ... 16 (pipelined global -> shared loads)
    tma_loads: int = 0         # cp.async.bulk.tensor (Hopper TMA)
    mma_sync: int = 0          # mma.sync (Ampere-style tensor-core instructions)
    wgmma: int = 0             # wgmma.mma_async (Hopper warpgroup tensor-core instructions)
    # Distinct fp32 -> 16-bit float conversions in the PTX, e.g. "cvt.rn.bf16x2.f32" (.rn:
    # to nearest, ties to even; .rz would truncate).
    downcasts: tuple[str, ...] = ()
    # The same in the SASS (with sass=True): "F2FP.BF16.F32.PACK_AB" rounds to nearest;
    # other modes carry a suffix (".RZ"). None when not asked for.
    sass_downcasts: tuple[str, ...] | None = None


def float_downcasts(ptx: str) -> tuple[str, ...]:
    """The distinct fp32 -> bf16/fp16 ``cvt`` instructions of ``ptx``, with their rounding mode."""
    return tuple(sorted(set(re.findall(r"\bcvt\.[\w.]*?\.(?:bf16|f16)(?:x2)?\.f32\b", ptx))))


def sass_float_downcasts(cubin: bytes) -> tuple[str, ...]:
    """The distinct float-conversion instructions (``F2F*``) of the SASS of ``cubin``
    (disassembled with the cuobjdump bundled with Triton)."""
    from triton.tools.disasm import get_sass

    with contextlib.redirect_stderr(io.StringIO()):
        sass = get_sass(cubin)
    return tuple(sorted(set(re.findall(r"\bF2F[\w.]*", sass))))


def compile_report(kernel, signature: dict, constexprs: dict, divisible_by_16: list[str],
                   *, arch: int = 90, num_warps: int = 8, num_stages: int | None = None,
                   sass: bool = False) -> KernelReport:
    """Compile ``kernel`` (a ``triton.jit`` function) for ``sm_<arch>``.

    signature: runtime argument name -> Triton type ("*bf16", "i32", "fp32", ...).
    constexprs: constexpr (and specialised-to-1) argument values.
    divisible_by_16: arguments Triton would mark 16-divisible at launch (aligned
    pointers, strides and sizes that are multiples of 16).
    sass: also disassemble the binary and report its float conversions.
    """
    import os

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("compile_report needs TRITON_INTERPRET unset (the kernel must be a JITFunction)")
    names = kernel.arg_names
    full_sig = {a: ("constexpr" if a in constexprs else signature[a]) for a in names}
    attrs = {(names.index(a),): [["tt.divisibility", 16]] for a in divisible_by_16}
    options = {"num_warps": num_warps}
    if num_stages is not None:
        options["num_stages"] = num_stages
    log = io.StringIO()
    # A cached binary skips ptxas and its report: compile into a throwaway cache.
    cache_dir = tempfile.mkdtemp(prefix="entropy_gpu_aot_")
    overrides = {"TRITON_DUMP_PTXAS_LOG": "1", "TRITON_CACHE_DIR": cache_dir}
    saved = {k: os.environ.get(k) for k in overrides}
    os.environ.update(overrides)
    try:
        with contextlib.redirect_stdout(log):
            source = ASTSource(fn=kernel, signature=full_sig, constexprs=constexprs, attrs=attrs)
            compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)
    finally:
        shutil.rmtree(overrides["TRITON_CACHE_DIR"], ignore_errors=True)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    text = log.getvalue()
    regs = re.findall(r"Used (\d+) registers", text)
    spills = re.findall(r"(\d+) bytes spill stores", text)
    ptx = compiled.asm["ptx"]
    return KernelReport(
        arch=arch, num_warps=num_warps,
        registers=int(regs[-1]) if regs else None,
        spill_bytes=int(spills[-1]) if spills else None,
        loads_16B=ptx.count("ld.global.v4"), loads_8B=ptx.count("ld.global.v2"),
        loads_scalar_16bit=ptx.count("ld.global.b16"),
        stores_16B=ptx.count("st.global.v4"), stores_8B=ptx.count("st.global.v2"),
        num_stages=num_stages,
        async_copies_16B=len(re.findall(r"cp\.async\.c[ag]\.shared\.global[^;]*, (?:16|0x10)[,;]", ptx)),
        tma_loads=ptx.count("cp.async.bulk.tensor"),
        mma_sync=ptx.count("mma.sync"), wgmma=ptx.count("wgmma.mma_async"),
        downcasts=float_downcasts(ptx),
        sass_downcasts=sass_float_downcasts(compiled.asm["cubin"]) if sass else None,
    )


def token_stats_report(want=DEFAULT_WANT, *, dtype: str = "bf16",
                       block_v: int = 4096, num_warps: int = 8, arch: int = 90,
                       partial: bool = False, save_state: bool = False) -> KernelReport:
    """Report for the fused token-statistics kernel on contiguous, 16-aligned rows."""
    import triton.language as tl

    from .token_stats import _want_flags, accumulators_needed, token_stats_kernel

    need_s1, need_s2, need_q0, need_q12 = accumulators_needed(want)
    flags = _want_flags(want, save_state)
    signature = {
        "logits_ptr": f"*{dtype}", "targets_ptr": "*i64", "out_ptr": "*fp32", "state_ptr": "*fp32",
        "n_rows": "i32", "inner_rows": "i32", "vocab": "i32", "split_size": "i64",
        "stride_outer": "i64", "stride_inner": "i64", "inv_t": "fp32", "ignore_index": "i32",
    }
    constexprs = dict(stride_vocab=1, HAS_TARGETS=True, PARTIAL=partial, NEED_S1=need_s1, NEED_S2=need_s2,
                      NEED_Q0=need_q0, NEED_Q12=need_q12, ACC=tl.float32, BLOCK_V=block_v, **flags)
    aligned = ["logits_ptr", "targets_ptr", "out_ptr", "state_ptr", "vocab", "split_size",
               "stride_outer", "stride_inner"]
    return compile_report(token_stats_kernel, signature, constexprs, aligned, arch=arch, num_warps=num_warps)


def token_stats_backward_report(*, dtype: str = "bf16", grad_dtype: str | None = None, block_v: int = 4096,
                                num_warps: int = 8, arch: int = 90, sass: bool = False) -> KernelReport:
    """Report for the logits-gradient kernel on contiguous, 16-aligned rows (the gradient
    written with the same strides, as in the in-place mode). ``downcasts`` shows how a
    16-bit gradient is rounded."""
    import triton.language as tl

    from .token_stats_backward import token_stats_backward_kernel

    signature = {
        "logits_ptr": f"*{dtype}", "grad_ptr": f"*{grad_dtype or dtype}", "params_ptr": "*fp32",
        "target_cols_ptr": "*i64", "n_rows": "i32", "inner_rows": "i32", "vocab": "i32", "split_size": "i32",
        "stride_outer": "i64", "stride_inner": "i64", "grad_stride_outer": "i64", "grad_stride_inner": "i64",
        "inv_t": "fp32",
    }
    constexprs = dict(stride_vocab=1, grad_stride_vocab=1, ACC=tl.float32, BLOCK_V=block_v)
    aligned = ["logits_ptr", "grad_ptr", "params_ptr", "target_cols_ptr", "vocab", "split_size",
               "stride_outer", "stride_inner", "grad_stride_outer", "grad_stride_inner"]
    return compile_report(token_stats_backward_kernel, signature, constexprs, aligned, arch=arch,
                          num_warps=num_warps, sass=sass)


def linear_token_stats_report(want=DEFAULT_WANT, *, dtype: str = "bf16",
                              block_n: int = 64, block_v: int = 128, block_k: int = 64, num_warps: int = 8,
                              num_stages: int = 3, arch: int = 90, has_bias: bool = False) -> KernelReport:
    """Report for the GEMM-fused LM-head kernel (row-major hidden [N, H] and weight [V, H])."""
    from .linear_token_stats import linear_token_moments_kernel
    from .token_stats import accumulators_needed

    need_s1, need_s2, need_q0, need_q12 = accumulators_needed(want)
    signature = {
        "hidden_ptr": f"*{dtype}", "weight_ptr": f"*{dtype}", "bias_ptr": f"*{dtype}", "targets_ptr": "*i64",
        "state_ptr": "*fp32", "n_tokens": "i32", "vocab": "i32", "hidden_dim": "i32", "split_size": "i32",
        "stride_hn": "i64", "stride_wv": "i64", "inv_t": "fp32", "ignore_index": "i32",
    }
    constexprs = dict(stride_hk=1, stride_wk=1, HAS_BIAS=has_bias, HAS_TARGETS=True, NEED_S1=need_s1,
                      NEED_S2=need_s2, NEED_Q0=need_q0, NEED_Q12=need_q12,
                      DOT_PRECISION="ieee" if dtype == "fp32" else "tf32", UPCAST_OPERANDS=False,
                      BLOCK_N=block_n, BLOCK_V=block_v, BLOCK_K=block_k)
    aligned = ["hidden_ptr", "weight_ptr", "bias_ptr", "targets_ptr", "state_ptr", "hidden_dim", "split_size",
               "stride_hn", "stride_wv"]
    return compile_report(linear_token_moments_kernel, signature, constexprs, aligned, arch=arch,
                          num_warps=num_warps, num_stages=num_stages)


def segment_comoments_report(*, dtype: str = "fp32", weighted: bool = True, block: int = 1024,
                             num_warps: int = 4, arch: int = 90) -> KernelReport:
    """Report for the segment co-moment kernel (Pearson over packed segments)."""
    import triton.language as tl

    from .segment_comoments import segment_comoments_kernel

    acc = "fp64" if dtype == "fp64" else "fp32"
    signature = {"x_ptr": f"*{dtype}", "y_ptr": f"*{dtype}", "weight_ptr": f"*{acc}",
                 "offsets_ptr": "*i64", "state_ptr": f"*{acc}", "n_pairs": "i64"}
    constexprs = dict(HAS_WEIGHT=weighted, ACC=tl.float64 if acc == "fp64" else tl.float32, BLOCK=block)
    aligned = ["x_ptr", "y_ptr", "weight_ptr", "offsets_ptr", "state_ptr"]
    return compile_report(segment_comoments_kernel, signature, constexprs, aligned, arch=arch,
                          num_warps=num_warps)


if __name__ == "__main__":
    all_stats = ALL_WANT
    default = DEFAULT_WANT
    print(f"{'stats':8} {'dtype':5} {'block':>5} {'warps':>5} {'arch':>4} {'regs':>4} {'spill':>5} "
          f"{'v4':>3} {'b16':>3}")
    for want, label in ((default, "default"), (all_stats, "all")):
        for dtype in ("bf16", "fp32"):
            for block_v, warps in ((2048, 8), (4096, 8), (4096, 16)):
                for arch in (80, 90):
                    r = token_stats_report(want, dtype=dtype, block_v=block_v, num_warps=warps, arch=arch)
                    print(f"{label:8} {dtype:5} {block_v:5d} {warps:5d} {arch:4d} {r.registers!s:>4} "
                          f"{r.spill_bytes!s:>5} {r.loads_16B:3d} {r.loads_scalar_16bit:3d}")
    print("\ntoken_stats_backward (one read, one write per logit)")
    print(f"{'dtype':5} {'block':>5} {'warps':>5} {'arch':>4} {'regs':>4} {'spill':>5} {'ld v4':>5} "
          f"{'st v4':>5} {'st v2':>5} downcast (PTX)")
    for dtype in ("bf16", "fp16", "fp32"):
        for block_v, warps in ((2048, 8), (4096, 8), (4096, 16)):
            for arch in (80, 90):
                r = token_stats_backward_report(dtype=dtype, block_v=block_v, num_warps=warps, arch=arch)
                print(f"{dtype:5} {block_v:5d} {warps:5d} {arch:4d} {r.registers!s:>4} {r.spill_bytes!s:>5} "
                      f"{r.loads_16B:5d} {r.stores_16B:5d} {r.stores_8B:5d} {' '.join(r.downcasts) or '-'}")
    print("\nlinear_token_stats (GEMM-fused LM head; tile = BLOCK_N x BLOCK_V x BLOCK_K)")
    print(f"{'stats':8} {'dtype':5} {'tile':>12} {'warps':>5} {'stages':>6} {'arch':>4} {'regs':>4} "
          f"{'spill':>5} "
          f"{'cp16':>4} {'mma':>4} {'wgmma':>5}")
    import torch

    from .linear_token_stats import default_tile

    configs = [("bf16", default_tile(torch.bfloat16)), ("bf16", (128, 64, 64, 3)),
               ("bf16", (128, 128, 64, 3)), ("fp32", default_tile(torch.float32))]
    for want, label in ((default, "default"), (all_stats, "all")):
        for dtype, (block_n, block_v, block_k, stages) in configs:
            for arch in (80, 90):
                r = linear_token_stats_report(want, dtype=dtype, block_n=block_n, block_v=block_v,
                                              block_k=block_k, num_stages=stages, arch=arch)
                tile = f"{block_n}x{block_v}x{block_k}"
                print(f"{label:8} {dtype:5} {tile:>12} {r.num_warps:5d} {r.num_stages!s:>6} {arch:4d} "
                      f"{r.registers!s:>4} {r.spill_bytes!s:>5} {r.async_copies_16B:4d} {r.mma_sync:4d} "
                      f"{r.wgmma:5d}")
    print()
    print(f"segment_comoments: {'dtype':5} {'weighted':>8} {'block':>5} {'warps':>5} {'arch':>4} {'regs':>4} "
          f"{'spill':>5} {'v4':>3} {'v2':>3}")
    for dtype in ("fp32", "bf16", "fp64"):
        for weighted in (False, True):
            for arch in (80, 90):
                r = segment_comoments_report(dtype=dtype, weighted=weighted, arch=arch)
                print(f"{'':19}{dtype:5} {weighted!s:>8} {1024:5d} {4:5d} {arch:4d} {r.registers!s:>4} "
                      f"{r.spill_bytes!s:>5} {r.loads_16B:3d} {r.loads_8B:3d}")
