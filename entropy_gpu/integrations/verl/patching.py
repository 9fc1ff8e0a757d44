"""``patch_verl`` / ``unpatch_verl``: put the drop-ins of ``dropin.py`` in place of verl's own
functions, in ``verl.utils.torch_functional`` (and Megatron's and the fused LM head's modules)
and in every loaded verl module that imported them by name; and restore verl's everywhere,
including modules loaded after patching."""

from __future__ import annotations

import contextlib
import importlib
import sys
from typing import Any

from .dropin import (
    calculate_sum_pi_squared_from_logits,
    entropy_from_logits,
    entropy_from_logits_with_chunking,
    fused_linear_for_ppo_forward,
    linear_cross_entropy_dropin,
    logprobs_from_logits,
    vocab_parallel_entropy,
    vocab_parallel_entropy_with_chunking,
    vocab_parallel_log_probs_from_logits,
    vocab_parallel_sum_pi_squared,
)

# The environment switch of the verl.plugins entry point (plugin.py). Defined here, below both
# plugin.py and corrpo.py, which name it: plugin.py imports corrpo.py, so corrpo.py must not import it.
ENV_VAR = "ENTROPY_GPU_VERL"

_TORCH_FUNCTIONAL = {
    "entropy_from_logits": entropy_from_logits,
    "entropy_from_logits_with_chunking": entropy_from_logits_with_chunking,
    "logprobs_from_logits": logprobs_from_logits,
    "calculate_sum_pi_squared_from_logits": calculate_sum_pi_squared_from_logits,
}
_MEGATRON = {
    "vocab_parallel_entropy": vocab_parallel_entropy,
    "vocab_parallel_entropy_with_chunking": vocab_parallel_entropy_with_chunking,
    "vocab_parallel_log_probs_from_logits": vocab_parallel_log_probs_from_logits,
    "vocab_parallel_sum_pi_squared": vocab_parallel_sum_pi_squared,
}
# (module, attribute, original) for every replacement made, in order.
_PATCHES: list[tuple[Any, str, Any]] = []
# id(replacement) -> (replacement, verl's original) for the functions patch_verl serves: modules
# imported after patching bind the replacement themselves (``from verl.utils.torch_functional
# import ...``), so unpatch_verl looks for these in every loaded verl module.
_REPLACEMENTS: dict[int, tuple[Any, Any]] = {}


def _set(owner: Any, name: str, value: Any) -> None:
    _PATCHES.append((owner, name, getattr(owner, name)))
    setattr(owner, name, value)


def _rebind_imported_names(replacements: dict[str, tuple[Any, Any]]) -> None:
    """Modules that did ``from verl... import f`` hold verl's ``f`` in their own namespace:
    point every loaded ``verl.*`` module's copy at the replacement."""
    for mod_name, module in list(sys.modules.items()):
        if module is None or not (mod_name == "verl" or mod_name.startswith("verl.")):
            continue
        namespace = getattr(module, "__dict__", {})
        for name, (original, new) in replacements.items():
            if namespace.get(name) is original:
                _set(module, name, new)


def is_patched() -> bool:
    """Whether ``patch_verl`` is in effect."""
    return bool(_PATCHES)


def patch_verl(*, fused_linear: bool = True, vocab_parallel: bool = True) -> list[str]:
    """Serve verl's entropy / log-prob / sum-of-squared-probability functions from entropy_gpu.

    Patches ``verl.utils.torch_functional`` and every loaded ``verl.*`` module that imported
    those functions by name; modules imported later pick up the patched ones. Call it before
    verl builds its engines (they bind ``entropy_from_logits`` at construction). Idempotent.

    Args:
        fused_linear: also serve ``FusedLinearForPPO`` and ``linear_cross_entropy``
            (``use_fused_kernels=True``) from ``entropy_gpu.linear_token_stats``.
        vocab_parallel: also serve ``verl.utils.megatron.tensor_parallel``'s functions from
            ``entropy_gpu.vocab_parallel_token_stats`` (skipped when Megatron is not installed).

    Returns:
        The dotted names of the functions now served by entropy_gpu.
    """
    if _PATCHES:
        return _patched_names()
    verl_f = importlib.import_module("verl.utils.torch_functional")
    replacements = {name: (getattr(verl_f, name), new) for name, new in _TORCH_FUNCTIONAL.items()}
    for name, (_, new) in replacements.items():
        _set(verl_f, name, new)
    if vocab_parallel:
        try:
            tp = importlib.import_module("verl.utils.megatron.tensor_parallel")
        except ImportError:  # no megatron-core: nothing of verl's can call these
            tp = None
        if tp is not None:
            for name, new in _MEGATRON.items():
                replacements[name] = (getattr(tp, name), new)
                _set(tp, name, new)
    if fused_linear:
        with contextlib.suppress(ImportError):
            fused = importlib.import_module("verl.utils.experimental.torch_functional")
            cls = fused.FusedLinearForPPO
            _set(cls, "forward", fused_linear_for_ppo_forward(cls.forward))
        with contextlib.suppress(ImportError):
            lce = importlib.import_module("verl.utils.kernel.linear_cross_entropy")
            original = lce.linear_cross_entropy
            replacements["linear_cross_entropy"] = (original, linear_cross_entropy_dropin(original))
            _set(lce, "linear_cross_entropy", replacements["linear_cross_entropy"][1])
    _REPLACEMENTS.update({id(new): (new, original) for original, new in replacements.values()})
    _rebind_imported_names(replacements)
    return _patched_names()


def _patched_names() -> list[str]:
    out = []
    for owner, name, _ in _PATCHES:
        label = (
            f"{getattr(owner, '__module__', '')}.{owner.__qualname__}"
            if isinstance(owner, type)
            else owner.__name__
        )
        out.append(f"{label}.{name}")
    return out


def unpatch_verl() -> None:
    """Restore verl's own functions everywhere ``patch_verl`` replaced them, and in every
    verl module loaded since then that bound a replacement by name (with the ``verl.plugins``
    entry point, patching runs at ``import verl``, before the engines and rollouts load)."""
    while _PATCHES:
        owner, name, original = _PATCHES.pop()
        setattr(owner, name, original)
    if not _REPLACEMENTS:
        return
    for mod_name, module in list(sys.modules.items()):
        if module is None or not (mod_name == "verl" or mod_name.startswith("verl.")):
            continue
        namespace = getattr(module, "__dict__", {})
        for name, value in list(namespace.items()):
            found = _REPLACEMENTS.get(id(value))
            if found is not None and found[0] is value:
                setattr(module, name, found[1])
    _REPLACEMENTS.clear()
