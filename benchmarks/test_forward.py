"""Forward: logits [N, V] and targets -> entropy, target log-prob, nll_grad_norm."""

import pytest
from conftest import case_params, run_benchmark_case


@pytest.mark.parametrize("shape,dtype,impl", case_params("forward"))
def test_forward(benchmark, shape, dtype, impl):
    run_benchmark_case(benchmark, "forward", shape, dtype, impl)
