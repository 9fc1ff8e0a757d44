"""Forward + backward: d/d logits of sum(w_logprob * logprob + w_entropy * entropy).
Registered when token_stats carries gradients (the autograd issue); skipped with the reason until then."""

import pytest
from conftest import case_params, run_benchmark_case


@pytest.mark.parametrize("shape,dtype,impl", case_params("forward_backward"))
def test_forward_backward(benchmark, shape, dtype, impl):
    run_benchmark_case(benchmark, "forward_backward", shape, dtype, impl)
