"""entropy_gpu inside verl (tested with verl 0.9.1; supported range ``>=0.9.0,<0.10``).

Two independent pieces, each switched on by one call (or by the ``ENTROPY_GPU_VERL``
environment variable through verl's ``verl.plugins`` entry point, so that every Ray
worker of a run does the same; see README "CorR-PO with verl"):

- ``patch_verl()`` (``patching.py``): verl's entropy, log-prob and sum-of-squared-probability
  functions (``verl.utils.torch_functional``), the fused LM-head paths (``FusedLinearForPPO``,
  ``linear_cross_entropy`` without a process group) and, when Megatron is installed, the
  vocabulary-parallel functions of ``verl.utils.megatron.tensor_parallel`` are served by
  the drop-ins of ``dropin.py``: one read of the logits per call, fp32 outputs, log-probs
  never above 0. verl divides the logits by the temperature before these functions, so they
  take the temperature only where verl passes it (the fused paths). ``unpatch_verl()``
  restores verl's own functions in every verl module that holds a replacement, including
  modules loaded after patching (which bound the replacement by name themselves).
- ``install_corrpo()`` (``corrpo.py``): registers the advantage estimator ``corrpo_grpo`` and
  the two smallest hooks that carry the per-token entropy and gradient measure from the
  actor's old-log-prob pass to it (verl's trainer otherwise drops the entropy there and never
  computes a measure; the same pass also keeps ``entropy_change``, and ``entropy_change/*``
  metrics, ``A * entropy_change`` over the response tokens, are logged with the advantages).
  The per-response term, bonus and ``corrpo/*`` metrics come from
  ``entropy_gpu.corrpo``; the advantages are verl's GRPO advantages of ``reward + bonus``.
  CorR-PO runs with the FSDP engine (``strategy=fsdp``/``fsdp2``) and
  ``use_fused_kernels=False`` (the fused paths never materialize logits for the measure).

``plugin.py`` holds ``plugin()``, what the entry point (``entropy_gpu.integrations.verl_plugin``)
runs. Nothing here imports ``verl`` at module import time: the ``verl.plugins`` entry point
loads this package while ``import verl`` is still running.
"""

from __future__ import annotations

from .corrpo import (
    ENTROPY_CHANGE_KEY,
    ENTROPY_KEY,
    ESTIMATOR_NAME,
    MEASURE_KEY,
    METRICS_KEY,
    VERL_DEFAULT_MEASURE,
    compute_corrpo_grpo_advantage,
    corrpo_config_from,
    install_corrpo,
    uninstall_corrpo,
)
from .dropin import (
    calculate_sum_pi_squared_from_logits,
    capture_measure,
    entropy_from_logits,
    entropy_from_logits_with_chunking,
    logprobs_from_logits,
    vocab_parallel_entropy,
    vocab_parallel_entropy_with_chunking,
    vocab_parallel_log_probs_from_logits,
    vocab_parallel_sum_pi_squared,
)
from .patching import ENV_VAR, is_patched, patch_verl, unpatch_verl
from .plugin import plugin

SUPPORTED_VERL = ">=0.9.0,<0.10"

__all__ = [
    "ENTROPY_CHANGE_KEY",
    "ENTROPY_KEY",
    "ENV_VAR",
    "ESTIMATOR_NAME",
    "MEASURE_KEY",
    "METRICS_KEY",
    "SUPPORTED_VERL",
    "VERL_DEFAULT_MEASURE",
    "calculate_sum_pi_squared_from_logits",
    "capture_measure",
    "compute_corrpo_grpo_advantage",
    "corrpo_config_from",
    "entropy_from_logits",
    "entropy_from_logits_with_chunking",
    "install_corrpo",
    "is_patched",
    "logprobs_from_logits",
    "patch_verl",
    "plugin",
    "uninstall_corrpo",
    "unpatch_verl",
    "vocab_parallel_entropy",
    "vocab_parallel_entropy_with_chunking",
    "vocab_parallel_log_probs_from_logits",
    "vocab_parallel_sum_pi_squared",
]
