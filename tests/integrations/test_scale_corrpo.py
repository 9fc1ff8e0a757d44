"""CorR-PO across processes: ``CorrPOTrainer`` under ``accelerate launch --multi_gpu
--num_processes 2`` (gloo on CPU: accelerate's torchrun launcher) runs a real GRPO step whose
group of 4 completions straddles the processes, and logs the same per-completion rewards
(the ``corrpo`` column is clip(phi(rho_i))), advantages and CorR-PO metrics as one process
on the same completions (tests/integrations/corrpo_accelerate_worker.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.distributed


def test_two_processes_log_what_one_process_logs(tmp_path, monkeypatch):
    worker = Path(__file__).with_name("corrpo_accelerate_worker.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "TRL_EXPERIMENTAL_SILENCE": "1"}
    (tmp_path / "two").mkdir()
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    proc = subprocess.run(launch + [str(worker), str(tmp_path / "two")], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    two = torch.load(tmp_path / "two" / "result.pt", weights_only=False)

    monkeypatch.setenv("TRL_EXPERIMENTAL_SILENCE", "1")
    from tests.integrations.corrpo_accelerate_worker import TEXTS, run

    (tmp_path / "one").mkdir()
    one = run(str(tmp_path / "one"), world_size=1)

    assert (one["world"], two["world"]) == (1, 2)
    assert one["completions"] == two["completions"] == TEXTS
    assert one["rewards"].keys() == two["rewards"].keys() == {"length", "corrpo"}
    corrpo = np.array(one["rewards"]["corrpo"])
    assert np.ptp(corrpo) > 0.1  # distinct per-completion terms, so the comparison can fail
    for name in one["rewards"]:
        np.testing.assert_allclose(two["rewards"][name], one["rewards"][name], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(two["advantages"], one["advantages"], rtol=1e-5, atol=1e-6)
    logged = [k for k in one["logs"][0] if k.startswith(("corrpo/", "rewards/", "reward"))]
    assert "corrpo/correlation" in logged and "rewards/corrpo/mean" in logged
    for key in logged:
        assert two["logs"][0][key] == pytest.approx(one["logs"][0][key], rel=1e-5, abs=1e-6), key
