"""Implementations compared by the benchmark suite, each behind one small adapter.

Every adapter returns a dict from output name to a ``[N]`` tensor, using the names
of ``token_stats``: ``entropy``, ``logprob`` (log p of the target) and
``nll_grad_norm`` (``||p - onehot(target)||_2``), at temperature 1. An
implementation that cannot produce an output leaves it out, and the tables say
which outputs each row computed (a row that computes less did less work).

Third-party packages (TRL, verl, Liger, quack) are optional: what is not installed,
not importable or cannot run on the device is listed as a ``Skipped`` with the
reason, never an error. The three cases:

- ``forward``: logits ``[N, V]`` and targets ``[N]`` -> outputs (no autograd).
- ``forward_backward``: the same, then ``backward`` of
  ``sum(w_logprob * logprob + w_entropy * entropy)`` to ``d logits``.
- ``linear``: the fused LM head, hidden ``[N, H]`` and weight ``[V, H]``
  -> the outputs of ``hidden @ weight.T`` without materializing the logits.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import sys
import types
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

import entropy_gpu

Outputs = dict[str, Tensor]

FORWARD_OUTPUTS = ("entropy", "logprob", "nll_grad_norm")
# The cost of entropy_change, side by side: entropy + logprob with and without it.
ENTROPY_LOGPROB = ("entropy", "logprob")
WITH_ENTROPY_CHANGE = ("entropy", "logprob", "entropy_change")
DIFFERENTIABLE_OUTPUTS = ("entropy", "logprob")
CASES = ("forward", "forward_backward", "linear")
# Every implementation name the harness knows, available here or not: ``--impl`` filters are
# checked against these before any work (tests/bench/test_harness.py keeps the list complete).
IMPLEMENTATION_NAMES = (
    "entropy_gpu[triton]", "entropy_gpu[torch]", "entropy+logprob [triton]",
    "entropy+logprob+entropy_change [triton]", "entropy+logprob [torch]",
    "entropy+logprob+entropy_change [torch]", "entropy_gpu linear_token_stats", "eager torch",
    "torch.compile(eager)", "trl utils", "trl kernel", "trl fused LM head", "verl", "liger CE forward",
    "liger CE", "liger fused linear CE", "quack CE forward", "quack CE",
)


def unmatched_impl_filters(filters: list[str]) -> list[str]:
    """The ``--impl`` filters (case-insensitive substrings) that match no known implementation."""
    return [f for f in filters if not any(f.lower() in name.lower() for name in IMPLEMENTATION_NAMES)]


@dataclass(frozen=True)
class Implementation:
    """One way to compute the outputs of a case.

    ``make()`` returns the callable to time; it is called once per case (shape and
    dtype), so that a compiled implementation compiles for that case alone.
    ``outputs`` are the names the callable returns.
    """

    name: str
    make: Callable[[], Callable[..., Outputs]]
    outputs: tuple[str, ...]
    source: str
    is_ours: bool = False
    is_baseline: bool = False
    note: str = ""


@dataclass(frozen=True)
class Skipped:
    """An implementation that is not run here, and why."""

    name: str
    reason: str


def package_version(distribution: str) -> str | None:
    """Installed version of a distribution, or None."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def _ours_source() -> str:
    return f"entropy-gpu {entropy_gpu.__version__}"


def _import_error(module: str) -> str | None:
    """None when ``module`` imports, else a one-line reason."""
    try:
        importlib.import_module(module)
    except Exception as exc:  # any import failure means "not usable here"
        return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}".strip()
    return None


# --------------------------------------------------------------------------- outputs


def nll_grad_norm_from(logprob: Tensor, sum_sq_probs: Tensor) -> Tensor:
    """``||p - onehot(y)||_2 = sqrt(1 - 2 p_y + sum p^2)`` (t = 1), for packages
    that expose ``sum p^2`` but not the norm."""
    p_y = logprob.float().exp()
    return (1.0 - 2.0 * p_y + sum_sq_probs.float()).clamp_min(0.0).sqrt()


# --------------------------------------------------------------------------- forward


def eager_forward(logits: Tensor, targets: Tensor) -> Outputs:
    """Plain eager PyTorch: materialize fp32 log-probs and probs, then reduce."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    p = logp.exp()
    entropy = -(p * logp).sum(-1)
    logprob = logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    one_hot_removed = p.scatter_add(-1, targets.unsqueeze(-1), -torch.ones_like(logprob).unsqueeze(-1))
    return {"entropy": entropy, "logprob": logprob, "nll_grad_norm": one_hot_removed.norm(dim=-1)}


def _compiled(fn: Callable) -> Callable[[], Callable]:
    def make() -> Callable:
        # A fresh cache per case: dynamo's per-function recompile limit would
        # otherwise silently fall back to eager after a few shapes.
        torch._dynamo.reset()
        return torch.compile(fn, dynamic=False)
    return make


def _ours_forward(backend: str, stats: tuple[str, ...] = FORWARD_OUTPUTS) -> Callable[[], Callable]:
    def make() -> Callable:
        def run(logits: Tensor, targets: Tensor) -> Outputs:
            out = entropy_gpu.token_stats(logits, targets, stats=stats, backend=backend)
            return {name: getattr(out, name) for name in stats}
        return run
    return make


def _ours_entropy_change_pair(backend: str, ours: str) -> list[Implementation]:
    """entropy + logprob without and with entropy_change (entropy_gpu's ``token_stats``): the
    statistic's overhead, timed side by side. Named without "entropy_gpu" so that ``--impl
    entropy_gpu`` keeps selecting the three-output comparison; ``--impl entropy+logprob`` picks these."""
    return [Implementation(f"{'+'.join(stats)} [{backend}]", _ours_forward(backend, stats), stats, ours,
                           note=f"entropy_gpu[{backend}] token_stats: the entropy_change overhead pair")
            for stats in (ENTROPY_LOGPROB, WITH_ENTROPY_CHANGE)]


def _trl_utils_forward() -> Callable:
    from trl.trainer.utils import entropy_from_logits, selective_log_softmax

    def run(logits: Tensor, targets: Tensor) -> Outputs:
        return {"logprob": selective_log_softmax(logits, targets), "entropy": entropy_from_logits(logits)}
    return run


def _trl_kernel_forward() -> Callable:
    from trl.kernels import selective_log_softmax_and_entropy

    def run(logits: Tensor, targets: Tensor) -> Outputs:
        logprob, entropy = selective_log_softmax_and_entropy(logits, targets)
        return {"logprob": logprob, "entropy": entropy}
    return run


def import_verl_torch_functional() -> types.ModuleType:
    """``verl.utils.torch_functional``, the module holding verl's entropy/log-prob code.

    ``import verl`` imports Ray (for ``verl.protocol``); the functions benchmarked
    here need only torch. When Ray is missing (a GPU machine with no network, where
    its wheel is too large to carry), the module is loaded with verl's package
    ``__init__`` skipped; the functions' code is verl's own either way.
    """
    try:
        return importlib.import_module("verl.utils.torch_functional")
    except ModuleNotFoundError as exc:
        if exc.name != "ray":
            raise
    spec = importlib.util.find_spec("verl")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("verl is not installed")
    for name in [m for m in sys.modules if m == "verl" or m.startswith("verl.")]:
        del sys.modules[name]
    package = types.ModuleType("verl")
    package.__path__ = list(spec.submodule_search_locations)
    sys.modules["verl"] = package
    return importlib.import_module("verl.utils.torch_functional")


def _verl_forward() -> Callable:
    functional = import_verl_torch_functional()

    def run(logits: Tensor, targets: Tensor) -> Outputs:
        entropy = functional.entropy_from_logits(logits)
        logprob = functional.logprobs_from_logits(logits, targets)
        sum_sq = functional.calculate_sum_pi_squared_from_logits(logits)
        return {"entropy": entropy, "logprob": logprob, "nll_grad_norm": nll_grad_norm_from(logprob, sum_sq)}
    return run


def _liger_forward() -> Callable:
    from liger_kernel.ops.cross_entropy import cross_entropy_forward

    def run(logits: Tensor, targets: Tensor) -> Outputs:
        result = cross_entropy_forward(
            logits, targets, weight=None, ignore_index=-100, lse_square_scale=0.0, label_smoothing=0.0,
            reduction="none", softcap=None, return_z_loss=False)
        return {"logprob": -result[0]}
    return run


def _quack_forward() -> Callable:
    from quack.cross_entropy import cross_entropy_fwd

    def run(logits: Tensor, targets: Tensor) -> Outputs:
        return {"logprob": -cross_entropy_fwd(logits, targets)}
    return run


def _needs_cuda(device: torch.device, name: str, what: str) -> Skipped | None:
    if device.type != "cuda":
        return Skipped(name, f"{what} needs a CUDA GPU")
    return None


def _ours_and_torch_forward(device: torch.device) -> list[Implementation | Skipped]:
    from ..backend import triton_supports

    ours = _ours_source()
    if device.type == "cuda" and triton_supports(device):
        triton = [Implementation("entropy_gpu[triton]", _ours_forward("triton"), FORWARD_OUTPUTS, ours,
                                 is_ours=True), *_ours_entropy_change_pair("triton", ours)]
    else:
        triton = [Skipped("entropy_gpu[triton]",
                          "Triton kernels need a CUDA GPU (CPU runs them only interpreted, in tests)")]
    torch_source = f"torch {torch.__version__}"
    return [
        *triton,
        Implementation("entropy_gpu[torch]", _ours_forward("torch"), FORWARD_OUTPUTS, ours,
                       is_ours=device.type != "cuda"),
        *_ours_entropy_change_pair("torch", ours),
        Implementation("eager torch", lambda: eager_forward, FORWARD_OUTPUTS, torch_source, is_baseline=True,
                       note="log_softmax, exp, gather, scatter_add, norm"),
        Implementation("torch.compile(eager)", _compiled(eager_forward), FORWARD_OUTPUTS, torch_source,
                       note="inductor, dynamic=False, compiled per shape (compile time not timed)"),
    ]


def _trl_forward_implementations(device: torch.device) -> list[Implementation | Skipped]:
    trl = package_version("trl")
    if trl is None:
        return [Skipped("trl", "trl is not installed (pip install trl)")]
    reason = _import_error("trl.trainer.utils")
    if reason:
        return [Skipped(f"trl {trl}", f"trl.trainer.utils does not import: {reason}")]
    note = ("selective_log_softmax + entropy_from_logits: two calls; on CUDA each runs TRL's Triton "
            "kernel when TRL >= 1.14" if device.type == "cuda" else
            "selective_log_softmax + entropy_from_logits: two calls, TRL's torch paths")
    found: list[Implementation | Skipped] = [
        Implementation("trl utils", _trl_utils_forward, ("entropy", "logprob"), f"trl {trl}", note=note)]
    if importlib.util.find_spec("trl.kernels.logprob_entropy") is None:
        found.append(Skipped("trl kernel", f"trl {trl} has no Triton logprob/entropy kernel (>= 1.14)"))
    elif (why := _needs_cuda(device, "trl kernel", "TRL's Triton logprob/entropy kernel")):
        found.append(why)
    else:
        found.append(Implementation("trl kernel", _trl_kernel_forward, ("entropy", "logprob"), f"trl {trl}",
                                    note="trl.kernels.selective_log_softmax_and_entropy"))
    return found


def _verl_forward_implementations(device: torch.device) -> list[Implementation | Skipped]:
    verl = package_version("verl")
    if verl is None:
        return [Skipped("verl",
                        "verl is not installed (pip install --no-deps verl; needs tensordict, omegaconf)")]
    try:
        import_verl_torch_functional()
    except Exception as exc:
        return [Skipped(f"verl {verl}",
                        f"verl.utils.torch_functional does not import: {type(exc).__name__}: {exc}")]
    return [Implementation(
        "verl", _verl_forward, FORWARD_OUTPUTS, f"verl {verl}",
        note="entropy_from_logits + logprobs_from_logits + calculate_sum_pi_squared_from_logits")]


def _cuda_package_forward(device: torch.device, label: str, distribution: str, missing: str, what: str,
                          module: str, implementation: Callable[[str], Implementation]
                          ) -> list[Implementation | Skipped]:
    """A CUDA-only package's forward: ``implementation(version)``, or why it is skipped (``label``:
    its short name; ``missing``: the reason when it is not installed; ``what`` needs CUDA)."""
    version = package_version(distribution)
    if version is None:
        return [Skipped(label, missing)]
    if (why := _needs_cuda(device, f"{label} {version}", what)):
        return [why]
    if (reason := _import_error(module)):
        return [Skipped(f"{label} {version}", f"does not import: {reason}")]
    return [implementation(version)]


def forward_implementations(device: torch.device) -> tuple[list[Implementation], list[Skipped]]:
    """The forward case's implementations runnable on ``device``, and the skipped ones."""
    liger = _cuda_package_forward(
        device, "liger", "liger-kernel", "liger-kernel is not installed (pip install liger-kernel)",
        "Liger's Triton cross-entropy", "liger_kernel.ops.cross_entropy",
        lambda version: Implementation(
            "liger CE forward", _liger_forward, ("logprob",), f"liger-kernel {version}",
            note="cross_entropy_forward, reduction='none'; loss in the input dtype"))
    quack = _cuda_package_forward(
        device, "quack", "quack-kernels",
        "quack-kernels is not installed (CUDA only; needs nvidia-cutlass-dsl)",
        "quack's CuTe-DSL cross-entropy", "quack.cross_entropy",
        lambda version: Implementation(
            "quack CE forward", _quack_forward, ("logprob",), f"quack-kernels {version}",
            note="quack.cross_entropy.cross_entropy_fwd"))
    found = (_ours_and_torch_forward(device) + _trl_forward_implementations(device)
             + _verl_forward_implementations(device) + liger + quack)
    return ([f for f in found if isinstance(f, Implementation)], [f for f in found if isinstance(f, Skipped)])


# --------------------------------------------------------------------------- forward + backward


def eager_differentiable(logits: Tensor, targets: Tensor) -> Outputs:
    """Eager PyTorch entropy and target log-prob, differentiable."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    entropy = -(logp.exp() * logp).sum(-1)
    return {"entropy": entropy, "logprob": logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)}


def _ours_differentiable(backend: str) -> Callable[[], Callable]:
    def make() -> Callable:
        def run(logits: Tensor, targets: Tensor) -> Outputs:
            out = entropy_gpu.token_stats(logits, targets, stats=DIFFERENTIABLE_OUTPUTS, backend=backend)
            return {"entropy": out.entropy, "logprob": out.logprob}
        return run
    return make


def _liger_differentiable() -> Callable:
    from liger_kernel.transformers.functional import liger_cross_entropy

    def run(logits: Tensor, targets: Tensor) -> Outputs:
        return {"logprob": -liger_cross_entropy(logits, targets, reduction="none")}
    return run


def _quack_differentiable() -> Callable:
    from quack.cross_entropy import cross_entropy

    def run(logits: Tensor, targets: Tensor) -> Outputs:
        return {"logprob": -cross_entropy(logits, targets, reduction="none")}
    return run


def _verl_differentiable() -> Callable:
    functional = import_verl_torch_functional()

    def run(logits: Tensor, targets: Tensor) -> Outputs:
        return {"entropy": functional.entropy_from_logits(logits),
                "logprob": functional.logprobs_from_logits(logits, targets)}
    return run


def forward_backward_implementations(device: torch.device) -> tuple[list[Implementation], list[Skipped]]:
    """Implementations of forward + backward of ``sum(w_lp * logprob + w_ent * entropy)``.

    Liger's and quack's cross-entropy differentiate the log-prob only; Liger writes
    the gradient into the logits during the forward (each timed call gets logits it
    overwrote: same work, different values).
    """
    impls: list[Implementation] = []
    skipped: list[Skipped] = []
    forward, forward_skipped = forward_implementations(device)
    by_name = {impl.name: impl for impl in forward}
    ours = _ours_source()
    if "entropy_gpu[triton]" in by_name:
        impls.append(Implementation("entropy_gpu[triton]", _ours_differentiable("triton"),
                                    DIFFERENTIABLE_OUTPUTS,
                                    ours, is_ours=True))
    impls.append(Implementation("entropy_gpu[torch]", _ours_differentiable("torch"), DIFFERENTIABLE_OUTPUTS,
                                ours,
                                is_ours=device.type != "cuda"))
    torch_source = f"torch {torch.__version__}"
    impls.append(Implementation("eager torch", lambda: eager_differentiable, DIFFERENTIABLE_OUTPUTS,
                                torch_source,
                                is_baseline=True))
    impls.append(Implementation("torch.compile(eager)", _compiled(eager_differentiable),
                                DIFFERENTIABLE_OUTPUTS,
                                torch_source))
    if "trl utils" in by_name:
        impls.append(Implementation("trl utils", _trl_utils_forward, DIFFERENTIABLE_OUTPUTS,
                                    by_name["trl utils"].source,
                                    note=by_name["trl utils"].note))
    if "trl kernel" in by_name:
        impls.append(Implementation("trl kernel", _trl_kernel_forward, DIFFERENTIABLE_OUTPUTS,
                                    by_name["trl kernel"].source))
    if "verl" in by_name:
        impls.append(Implementation("verl", _verl_differentiable, DIFFERENTIABLE_OUTPUTS,
                                    by_name["verl"].source,
                                    note="entropy_from_logits + logprobs_from_logits"))
    if "liger CE forward" in by_name:
        impls.append(Implementation("liger CE", _liger_differentiable, ("logprob",),
                                    by_name["liger CE forward"].source,
                                    note="liger_cross_entropy, reduction='none'; "
                                         "gradient written in the forward"))
    if "quack CE forward" in by_name:
        impls.append(Implementation("quack CE", _quack_differentiable, ("logprob",),
                                    by_name["quack CE forward"].source,
                                    note="quack.cross_entropy.cross_entropy"))
    skipped += [s for s in forward_skipped if not s.name.startswith("entropy_gpu")]
    return impls, skipped


# --------------------------------------------------------------------------- fused LM head


def eager_linear(hidden: Tensor, weight: Tensor, targets: Tensor) -> Outputs:
    """Materialize the logits with one matmul, then eager PyTorch statistics."""
    return eager_forward(hidden @ weight.t(), targets)


def _ours_linear() -> Callable:
    def run(hidden: Tensor, weight: Tensor, targets: Tensor) -> Outputs:
        out = entropy_gpu.linear_token_stats(hidden, weight, targets, stats=FORWARD_OUTPUTS)
        return {"entropy": out.entropy, "logprob": out.logprob, "nll_grad_norm": out.nll_grad_norm}
    return run


TRL_LM_HEAD_CHUNK = 32768  # the vocabulary tile TRL's fused LM head uses in its trainers (1.15/1.16)


def _trl_linear() -> Callable:
    from trl.kernels import ChunkedLogProbFunction

    def run(hidden: Tensor, weight: Tensor, targets: Tensor) -> Outputs:
        logprob, entropy, log_sum_sq, _, _ = ChunkedLogProbFunction.apply(
            hidden, weight, None, targets, 1.0, TRL_LM_HEAD_CHUNK, None, 1.0, ("entropy", "log_sum_sq_probs"))
        nll = nll_grad_norm_from(logprob, log_sum_sq.exp())
        return {"entropy": entropy, "logprob": logprob, "nll_grad_norm": nll}
    return run


def linear_implementations(device: torch.device) -> tuple[list[Implementation], list[Skipped]]:
    """Fused LM head: hidden ``[N, H]``, weight ``[V, H]`` -> the forward outputs."""
    impls: list[Implementation] = []
    skipped: list[Skipped] = []
    impls.append(Implementation("entropy_gpu linear_token_stats", _ours_linear, FORWARD_OUTPUTS,
                                _ours_source(), is_ours=True))
    torch_source = f"torch {torch.__version__}"
    impls.append(Implementation("eager torch", lambda: eager_linear, FORWARD_OUTPUTS, torch_source,
                                is_baseline=True,
                                note="hidden @ weight.T, then eager statistics"))
    impls.append(Implementation("torch.compile(eager)", _compiled(eager_linear), FORWARD_OUTPUTS,
                                torch_source))
    trl = package_version("trl")
    if trl is None:
        skipped.append(Skipped("trl fused LM head", "trl is not installed"))
    elif importlib.util.find_spec("trl.kernels.chunked_logprob") is None:
        skipped.append(Skipped("trl fused LM head", f"trl {trl} has no chunked fused LM head (>= 1.15)"))
    elif (reason := _import_error("trl.kernels")):
        skipped.append(Skipped("trl fused LM head", f"trl.kernels does not import: {reason}"))
    else:
        impls.append(Implementation("trl fused LM head", _trl_linear, FORWARD_OUTPUTS, f"trl {trl}",
                                    note=f"ChunkedLogProbFunction, vocab tile {TRL_LM_HEAD_CHUNK}"))
    skipped.append(Skipped("liger fused linear CE", "not wired: its per-token API differs by version"))
    return impls, skipped


# --------------------------------------------------------------------------- cases


def case_unavailable_reason(case: str) -> str | None:
    """None when ``case`` can run with our implementation, else why it is skipped (every
    case runs in this version; the suite keeps asking so that a new case can register late)."""
    if case in CASES:
        return None
    raise ValueError(f"unknown case {case!r}; choose from {CASES}")


def implementations_for(case: str, device: torch.device) -> tuple[list[Implementation], list[Skipped]]:
    """Implementations of ``case`` on ``device`` and the skipped ones."""
    table = {"forward": forward_implementations, "forward_backward": forward_backward_implementations,
             "linear": linear_implementations}
    if case not in table:
        raise ValueError(f"unknown case {case!r}; choose from {CASES}")
    return table[case](device)
