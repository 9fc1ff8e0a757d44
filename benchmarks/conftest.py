"""pytest-benchmark configuration: ``pytest benchmarks/ --benchmark-only``.

Shapes are chosen per device; BENCH_SMOKE=1 shrinks them (CI runs that to check the
benchmarks still run, not how fast).
"""

import os

import pytest
import torch

SMOKE = os.environ.get("BENCH_SMOKE") == "1"
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(scope="session")
def device():
    return DEVICE
