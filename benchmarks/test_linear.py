"""Fused LM head: hidden [N, H], weight [V, H] -> the forward outputs without materializing logits.
Registered when entropy_gpu.linear_token_stats exists (issue 4); skipped with the reason until then."""

import pytest
from conftest import case_params, run_benchmark_case


@pytest.mark.parametrize("shape,dtype,impl", case_params("linear"))
def test_linear(benchmark, shape, dtype, impl):
    run_benchmark_case(benchmark, "linear", shape, dtype, impl)
