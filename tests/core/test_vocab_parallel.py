"""Vocabulary-parallel statistics on a real 2-process gloo group, forward and backward,
against the unsharded result (the checks run in tests/core/vocab_parallel_worker.py)."""

from __future__ import annotations

import os
import sys

import pytest
import torch

import entropy_gpu
from tests.helpers import run_ranks

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "vocab_parallel_worker.py")


@pytest.mark.distributed
def test_two_gloo_ranks_match_the_unsharded_statistics_and_gradients(tmp_path):
    world = 2
    run_ranks([[sys.executable, WORKER, str(rank), str(world), str(tmp_path / "rendezvous")]
               for rank in range(world)])


def test_needs_an_initialized_process_group():
    if torch.distributed.is_initialized():  # pragma: no cover - not in this suite
        pytest.skip("a process group is already initialized in this process")
    with pytest.raises(RuntimeError, match="init_process_group"):
        entropy_gpu.vocab_parallel_token_stats(torch.randn(2, 5))
