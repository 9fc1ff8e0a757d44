"""patch_verl / unpatch_verl (entropy_gpu.integrations.verl.patching) in the real verl package:
every verl module that holds one of verl's functions gets the drop-in, and gets verl's own back,
modules loaded after patching included."""

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

import verl.utils.torch_functional as verl_F  # noqa: E402
from verl.utils.experimental.torch_functional import FusedLinearForPPO  # noqa: E402

from entropy_gpu.integrations import verl as ev  # noqa: E402
from tests.integrations.verl.common import ORIGINALS  # noqa: E402


def test_patch_reaches_modules_that_imported_by_name_and_unpatch_restores():
    import verl.workers.engine.fsdp.transformer_impl as fsdp_impl
    import verl.workers.engine.megatron.transformer_impl as megatron_impl

    ev.unpatch_verl()
    before = (fsdp_impl.logprobs_from_logits, megatron_impl.vocab_parallel_entropy, FusedLinearForPPO.forward)
    names = ev.patch_verl()
    try:
        assert "verl.utils.torch_functional.logprobs_from_logits" in names
        assert verl_F.logprobs_from_logits is ev.logprobs_from_logits
        assert fsdp_impl.logprobs_from_logits is ev.logprobs_from_logits  # imported by name
        assert megatron_impl.vocab_parallel_entropy is ev.vocab_parallel_entropy
        assert megatron_impl.vocab_parallel_log_probs_from_logits is ev.vocab_parallel_log_probs_from_logits
        assert FusedLinearForPPO.forward is not before[2]
        assert ev.patch_verl() == names  # idempotent
    finally:
        ev.unpatch_verl()
    assert not ev.is_patched()
    assert (
        fsdp_impl.logprobs_from_logits,
        megatron_impl.vocab_parallel_entropy,
        FusedLinearForPPO.forward,
    ) == before
    assert all(getattr(verl_F, n) is f for n, f in ORIGINALS.items())


UNPATCH_AFTER_LATE_IMPORTS = """
import sys
import verl  # ENTROPY_GPU_VERL=kernels: the plugin patches here, before the engines load
from entropy_gpu.integrations import verl as ev
from entropy_gpu.integrations.verl import patching
assert ev.is_patched()
import verl.workers.engine.fsdp.transformer_impl as fsdp_impl  # loaded after patching
assert fsdp_impl.logprobs_from_logits is ev.logprobs_from_logits
ev.unpatch_verl()
ev.patch_verl()
assert "verl.workers.rollout.naive.naive_rollout" not in sys.modules
import verl.workers.rollout.naive.naive_rollout as naive  # loaded after patch_verl()
assert naive.logprobs_from_logits is ev.logprobs_from_logits
ev.unpatch_verl()
ours = {id(f) for f in (*patching._TORCH_FUNCTIONAL.values(), *patching._MEGATRON.values())}
left = sorted(f"{m}.{k}" for m, mod in list(sys.modules.items())
              if mod is not None and m.startswith("verl")
              for k, v in list(vars(mod).items()) if id(v) in ours)
print("left:", left)
print(fsdp_impl.logprobs_from_logits.__module__, naive.logprobs_from_logits.__module__)
"""


def test_unpatch_restores_modules_imported_after_patching():
    """With the plugin, patching runs at ``import verl``; engines and the rollout load later and
    bind the patched names themselves. unpatch_verl must restore those bindings too."""
    env = dict(os.environ, ENTROPY_GPU_VERL="kernels")
    out = subprocess.run([sys.executable, "-c", UNPATCH_AFTER_LATE_IMPORTS], capture_output=True, text=True,
                         env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.strip().splitlines()
    assert lines[-2] == "left: []"
    assert lines[-1] == "verl.utils.torch_functional verl.utils.torch_functional"
