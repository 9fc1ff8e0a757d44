"""Vocabulary-parallel statistics on a real 2-process gloo group, forward and backward,
against the unsharded result (the checks run in tests/vocab_parallel_worker.py)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import entropy_gpu

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "vocab_parallel_worker.py")


@pytest.mark.distributed
def test_two_gloo_ranks_match_the_unsharded_statistics_and_gradients(tmp_path):
    world = 2
    procs = [subprocess.Popen([sys.executable, WORKER, str(rank), str(world), str(tmp_path / "rendezvous")],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for rank in range(world)]
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=400)[0])
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    for rank, (proc, output) in enumerate(zip(procs, outputs)):
        assert proc.returncode == 0, f"rank {rank} failed:\n{output[-4000:]}"
        assert f"rank {rank} ok" in output


def test_needs_an_initialized_process_group():
    if torch.distributed.is_initialized():  # pragma: no cover - not in this suite
        pytest.skip("a process group is already initialized in this process")
    with pytest.raises(RuntimeError, match="init_process_group"):
        entropy_gpu.vocab_parallel_token_stats(torch.randn(2, 5))
