"""The verl.plugins entry point (entropy_gpu.integrations.verl_plugin, running
entropy_gpu.integrations.verl.plugin): nothing unless ENTROPY_GPU_VERL is set."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

# verl imports Megatron and Ray, which warn about optional accelerators on a CPU machine.
pytestmark = [
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
]

verl = pytest.importorskip("verl", reason="verl is not installed (bash scripts/setup.sh dev installs it)")

from entropy_gpu.integrations import verl as ev  # noqa: E402
from tests.integrations.verl.common import ORIGINALS  # noqa: E402


def test_plugin_entry_point_does_nothing_unless_enabled():
    # This process imported verl without ENTROPY_GPU_VERL: verl's own functions.
    assert os.environ.get(ev.ENV_VAR, "") == ""
    assert ORIGINALS["entropy_from_logits"].__module__ == "verl.utils.torch_functional"
    code = (
        "import verl, verl.utils.torch_functional as F; from entropy_gpu.integrations import verl as ev; "
        "print(F.entropy_from_logits is ev.entropy_from_logits, "
        "F.logprobs_from_logits is ev.logprobs_from_logits)"
    )
    env = dict(os.environ, ENTROPY_GPU_VERL="kernels")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "True True"
