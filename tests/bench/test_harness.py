"""The benchmark harness itself: bytes accounting, error check, reports, CLI, and
that every adapter computes what it claims (float64 reference, tiny shapes).

No timing is asserted here: speed is measured by ``entropy-gpu bench`` and
``benchmarks/``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from entropy_gpu.bench import impls as bench_impls
from entropy_gpu.bench.impls import (
    DIFFERENTIABLE_OUTPUTS,
    FORWARD_OUTPUTS,
    Implementation,
    case_unavailable_reason,
    eager_differentiable,
    eager_forward,
    implementations_for,
)
from entropy_gpu.bench.report import format_table, load_run, markdown_report, write_reports
from entropy_gpu.bench.suite import (
    BenchRun,
    Result,
    add_ratios,
    errors_ok,
    floor_ms,
    forward_backward_bytes,
    forward_bytes,
    input_bytes,
    linear_bytes,
    linear_flops,
    make_inputs,
    max_errors,
    parse_shape,
    required_bytes,
    run_case,
    sample_rows,
)
from entropy_gpu.cli import main

CPU = torch.device("cpu")


def _impl(name: str, fn, outputs=FORWARD_OUTPUTS, **kwargs) -> Implementation:
    return Implementation(name, lambda: fn, tuple(outputs), "test", **kwargs)


# --------------------------------------------------------------------------- bytes and floors


def test_forward_bytes_count_logits_once_targets_and_three_outputs():
    n, v = 8192, 151936
    assert forward_bytes(n, v, torch.bfloat16) == n * v * 2 + n * 8 + 3 * n * 4
    assert forward_bytes(n, v, torch.float32) == n * v * 4 + n * 8 + 3 * n * 4
    assert required_bytes("forward", (n, v), torch.bfloat16) == forward_bytes(n, v, torch.bfloat16)


def test_forward_backward_bytes_read_logits_and_write_their_gradient():
    n, v = 128, 1000
    assert forward_backward_bytes(n, v, torch.bfloat16) == 2 * n * v * 2 + n * 8 + 4 * n * 4


def test_linear_bytes_and_flops_never_count_the_logits():
    n, h, v = 1024, 2560, 262144
    assert linear_bytes(n, h, v, torch.bfloat16) == (n + v) * h * 2 + n * 8 + 3 * n * 4
    assert linear_flops(n, h, v) == 2 * n * h * v


def test_floor_of_the_spec_reference_shape():
    # The benchmark shape: 8192 x 151936 bf16 is 2.49 GB, ~0.8 ms at ~3.0 TB/s measured copy.
    assert 2.48e9 < forward_bytes(8192, 151936, torch.bfloat16) < 2.50e9
    assert 0.82 < floor_ms("forward", (8192, 151936), torch.bfloat16, 3000.0) < 0.84


def test_parse_shape():
    assert parse_shape("8192x151936") == (8192, 151936)
    assert parse_shape("16X4096x128256") == (16, 4096, 128256)
    for bad in ("8192", "axb", "0x10", "1x2x3x4"):
        with pytest.raises(ValueError, match="shape"):
            parse_shape(bad)


# --------------------------------------------------------------------------- error check


def test_sample_rows_cover_first_and_last_row():
    rows = sample_rows(1000, CPU, 64)
    assert rows[0] == 0 and rows[-1] == 999 and len(rows) == 64
    assert sample_rows(5, CPU, 64).tolist() == [0, 1, 2, 3, 4]


def test_correct_implementations_pass_the_error_check():
    inputs = make_inputs("forward", (40, 3001), torch.float32, CPU)
    errors, nonfinite = max_errors(eager_forward(*inputs.tensors), inputs)
    assert set(errors) == set(FORWARD_OUTPUTS) and nonfinite == 0
    assert errors_ok(errors, nonfinite)


def _slightly_wrong_entropy(logits, targets):
    out = eager_forward(logits, targets)
    return {**out, "entropy": out["entropy"] * 1.01}  # 1% off: fast and wrong


def _nan_in_an_unsampled_row(logits, targets):
    out = eager_forward(logits, targets)
    out["logprob"][1] = float("nan")  # row 1 is not among the sampled rows of 200
    return out


def _raises(logits, targets):
    raise RuntimeError("adapter broke")


def test_a_wrong_implementation_is_flagged_and_the_others_still_run():
    impls = [_impl("eager torch", eager_forward, is_baseline=True),
             _impl("wrong entropy", _slightly_wrong_entropy),
             _impl("nan", _nan_in_an_unsampled_row),
             _impl("broken", _raises)]
    results = {r.implementation: r for r in
               run_case("forward", (200, 1000), torch.float32, CPU, impls=impls, repeats=1,
                        measure_memory=False)}
    assert 1 not in sample_rows(200, CPU).tolist()
    assert results["eager torch"].error_ok is True
    wrong = results["wrong entropy"]
    assert wrong.error_ok is False and wrong.max_err["entropy"] > 1e-3 and wrong.max_err["logprob"] < 1e-5
    assert results["nan"].error_ok is False and results["nan"].nonfinite == 1
    broken = results["broken"]
    assert broken.status == "error" and "adapter broke" in broken.note and broken.median_ms is None
    table = format_table(list(results.values()))
    assert "!" in table and "broken: error: RuntimeError: adapter broke" in table


def _gradient_misses_entropy(logits, targets):
    out = eager_differentiable(logits, targets)
    return {"entropy": out["entropy"].detach(), "logprob": out["logprob"]}


def test_forward_backward_checks_the_gradient():
    impls = [_impl("eager torch", eager_differentiable, DIFFERENTIABLE_OUTPUTS, is_baseline=True),
             _impl("no entropy gradient", _gradient_misses_entropy, DIFFERENTIABLE_OUTPUTS)]
    results = run_case("forward_backward", (16, 500), torch.float32, CPU, impls=impls, repeats=1,
                       measure_memory=False)
    good, bad = results
    assert good.error_ok and good.max_err["grad_logits"] < 1e-6
    assert bad.max_err["entropy"] < 1e-6 and bad.max_err["grad_logits"] > 0.1 and bad.error_ok is False


def test_ratios_come_from_the_same_run():
    results = [Result("forward", name, "t", [1, 2], "fp32", "cpu", ["entropy"], median_ms=ms, is_ours=ours,
                      is_baseline=base)
               for name, ms, ours, base in [("ours", 2.0, True, False), ("eager", 8.0, False, True),
                                            ("other", 4.0, False, False)]]
    add_ratios(results)
    assert [r.speedup_vs_eager for r in results] == [4.0, 1.0, 2.0]
    assert [r.time_vs_ours for r in results] == [1.0, 4.0, 2.0]


# --------------------------------------------------------------------------- reports and CLI


def _small_run() -> BenchRun:
    impls = [_impl("eager torch", eager_forward, is_baseline=True), _impl("wrong entropy",
                                                                          _slightly_wrong_entropy)]
    run = BenchRun(metadata={"device_name": "test cpu", "date": "2026-01-01 00:00", "commit": "abc123",
                             "command": "entropy-gpu bench --shape 8x100", "copy_gbps": 10.0,
                             "notes": ["2 shared cores"]})
    run.results = run_case("forward", (8, 100), torch.float32, CPU, impls=impls, repeats=1, copy_gbps=10.0,
                           measure_memory=False)
    run.skipped_cases["linear"] = "not in this version"
    run.skipped_implementations["forward"] = [{"name": "liger", "reason": "needs a CUDA GPU"}]
    return run


def test_json_markdown_and_png_writers(tmp_path):
    run = _small_run()
    paths = write_reports(run, tmp_path, "cpu-test")
    names = sorted(p.name for p in paths)
    assert names[:2] == ["cpu-test.json", "cpu-test.md"]
    data = json.loads((tmp_path / "cpu-test.json").read_text())
    assert data["metadata"]["commit"] == "abc123" and len(data["results"]) == 2
    row = data["results"][0]
    for key in ("median_ms", "times_ms", "gbytes_per_s", "fraction_of_copy", "max_err", "error_ok",
                "required_bytes", "shape", "dtype", "outputs"):
        assert key in row
    assert row["fraction_of_copy"] == pytest.approx(row["gbytes_per_s"] / 10.0)
    again = load_run(tmp_path / "cpu-test.json")
    assert [r.row() for r in again.results] == [r.row() for r in run.results]
    md = (tmp_path / "cpu-test.md").read_text()
    assert md == markdown_report(run)
    for text in ("`abc123`", "`entropy-gpu bench --shape 8x100`", "2 shared cores", "| 8x100 |",
                 "linear: not in this version", "liger: needs a CUDA GPU", "!"):
        assert text in md, text
    if any(p.suffix == ".png" for p in paths):
        assert (tmp_path / "cpu-test.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_bench_writes_reports(tmp_path, capsys):
    # A tiny LM-head shape too: with linear_token_stats present the linear case runs.
    argv = ["bench", "--case", "forward", "linear", "--shape", "16x300", "--linear-shape", "16x32x300",
            "--dtype", "fp32", "--impl",
            "entropy_gpu[torch]", "eager torch", "--repeats", "1", "--no-memory", "--out-dir", str(tmp_path),
            "--name", "run", "--note", "test note", "--quiet"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "entropy_gpu[torch]" in out and "eager torch" in out
    data = json.loads((tmp_path / "run.json").read_text())
    assert data["metadata"]["command"].startswith("entropy-gpu bench --case forward")
    assert data["metadata"]["notes"] == ["test note"] and data["metadata"]["copy_gbps"] > 0
    assert {r["implementation"] for r in data["results"]} == {"entropy_gpu[torch]", "eager torch"}
    assert all(r["error_ok"] for r in data["results"])
    if case_unavailable_reason("linear"):
        assert "linear" in data["skipped_cases"]


@pytest.mark.parametrize(("case", "shape"), [("forward", (7, 301)), ("forward_backward", (5, 129)),
                                           ("linear", (6, 16, 77))])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_input_bytes_are_what_make_inputs_allocates(case, shape, dtype):
    """The memory check before allocating counts the inputs (and the gradient a backward writes)."""
    inputs = make_inputs(case, shape, dtype, CPU)
    held = inputs.nbytes() + sum(c.numel() * c.element_size() for c in inputs.cotangents.values())
    gradient = shape[0] * shape[1] * dtype.itemsize if case == "forward_backward" else 0
    assert input_bytes(case, shape, dtype) == held + gradient


def test_cli_floors_allocate_nothing_so_any_shape_goes(capsys):
    assert main(["bench", "--case", "forward", "--shape", "20000000x262144", "--dtype", "fp32", "--floors",
                 "3000"]) == 0
    assert "20000000x262144" in capsys.readouterr().out


def test_cli_floors(capsys):
    assert main(["bench", "--case", "forward", "--shape", "8192x151936", "--dtype", "bf16", "--floors",
                 "3000"]) == 0
    out = capsys.readouterr().out
    assert "8192x151936" in out and " 0.830 " in out


# --------------------------------------------------------------------------- adapters


@pytest.mark.parametrize("case", ["forward", "forward_backward", "linear"])
def test_every_available_adapter_matches_float64(case):
    """Ours, eager, and whichever of TRL/verl are installed (torch.compile is left to
    the benchmarks: its first compile takes ~30 s here)."""
    impls, skipped = implementations_for(case, CPU)
    assert all(s.reason for s in skipped)
    impls = [i for i in impls if not i.name.startswith("torch.compile")]
    if case_unavailable_reason(case):
        impls = [i for i in impls if not i.is_ours]
    shape = (12, 24, 700) if case == "linear" else (12, 700)
    results = run_case(case, shape, torch.float32, CPU, impls=impls, repeats=1, measure_memory=False)
    for r in results:
        assert r.status == "ok", (r.implementation, r.note)
        assert r.error_ok, (r.implementation, r.max_err)
        assert set(r.outputs) <= set(r.max_err)


def test_gpu_only_adapters_under_the_triton_interpreter():
    """TRL's Triton kernel and Liger's cross-entropy, run on CPU by Triton's interpreter
    (tests/conftest sets TRITON_INTERPRET=1), so their adapters are checked before a GPU run."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs TRITON_INTERPRET=1 (CPU tensors)")
    impls = []
    trl_kernel = bench_impls.importlib.util.find_spec("trl.kernels.logprob_entropy")
    if bench_impls.package_version("trl") and trl_kernel:
        impls.append(Implementation("trl kernel", bench_impls._trl_kernel_forward,
                                    ("entropy", "logprob"), "trl"))
    if bench_impls.package_version("liger-kernel"):
        impls.append(Implementation("liger", bench_impls._liger_forward, ("logprob",), "liger"))
    if not impls:
        pytest.skip("neither trl >= 1.14 nor liger-kernel is installed")
    for case in ("forward", "forward_backward"):
        if case == "forward_backward":
            impls = [Implementation(i.name,
                                    bench_impls._liger_differentiable if i.name == "liger" else i.make,
                                    i.outputs, i.source) for i in impls]
        for r in run_case(case, (3, 1500), torch.float32, CPU, impls=impls, repeats=1, measure_memory=False):
            assert r.status == "ok" and r.error_ok, (case, r.implementation, r.note, r.max_err)


def test_verl_loads_without_ray():
    """verl's package __init__ imports Ray; the GPU machine gets verl without it."""
    if not bench_impls.package_version("verl"):
        pytest.skip("verl is not installed")
    code = ("import sys; sys.modules['ray'] = None\n"
            "from entropy_gpu.bench.impls import import_verl_torch_functional\n"
            "print(import_verl_torch_functional().entropy_from_logits.__module__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "verl.utils.torch_functional"


def test_cpu_peak_memory_of_eager_exceeds_the_fp32_logits():
    """The fresh-process measurement sees eager's materialized fp32 copies."""
    from entropy_gpu.bench.suite import cpu_peak_extra_mib

    peak = cpu_peak_extra_mib("forward", "eager torch", (256, 32000), "fp32")
    if peak is None:
        pytest.skip("no /proc/self/clear_refs here")
    assert peak > 256 * 32000 * 4 / 2**20  # at least one fp32 copy of the logits


def test_absent_packages_are_skipped_with_a_reason(monkeypatch):
    """Where TRL, verl, Liger and quack are not installed (CI), the suite still has
    ours, eager and torch.compile, and says what it skipped."""
    monkeypatch.setattr(bench_impls, "package_version", lambda name: None)
    impls, skipped = implementations_for("forward", CPU)
    assert [i.name for i in impls] == ["entropy_gpu[torch]", "entropy+logprob [torch]",
                                       "entropy+logprob+entropy_change [torch]", "eager torch",
                                       "torch.compile(eager)"]
    reasons = {s.name: s.reason for s in skipped}
    for name in ("trl", "verl", "liger", "quack"):
        assert "not installed" in reasons[name]


def test_impl_filters_are_checked_against_every_known_name():
    """``--impl`` is refused before work when it matches nothing; the names it is checked
    against include every implementation (and every skipped one) the harness lists."""
    from entropy_gpu.bench.impls import CASES, IMPLEMENTATION_NAMES, unmatched_impl_filters

    for case in CASES:
        impls, skipped = implementations_for(case, CPU)
        assert {i.name for i in impls} <= set(IMPLEMENTATION_NAMES), case
        for s in skipped:  # skipped ones may carry a version ("liger 0.5.2") or a package name ("trl")
            assert any(s.name.split()[0].lower() in name.lower() for name in IMPLEMENTATION_NAMES), s
    assert unmatched_impl_filters(["EAGER", "trl", "nosuch", "quack"]) == ["nosuch"]
