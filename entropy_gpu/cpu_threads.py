"""How many torch CPU threads a command uses: the cores the current load leaves idle.

OpenMP threads that outnumber the idle cores wait on each other at every parallel
region's barrier: on a 2-core machine with one core busy, ``entropy-gpu sia`` on 10 traces
took 30-65 s with 2 threads and 4.7 s with 1 (issue 20, item 3). Every command that
computes (``demo``, ``bench``, ``sia``, ``sia-bench``, ``grad-report``) takes ``--threads``
and defaults to ``choose_cpu_threads``.
"""

from __future__ import annotations

import os

import torch


def load_average() -> list[float] | None:
    """1, 5 and 15-minute load averages (other processes competing for the CPU)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def cpu_count() -> int:
    """CPUs this process may run on (the affinity mask, which containers narrow)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def choose_cpu_threads(requested: int | None = None, *, load_1min: float | None = None,
                       cores: int | None = None, default: int | None = None) -> tuple[int, str]:
    """Torch threads for a CPU command and why: ``requested`` when given; otherwise
    the cores the current load leaves idle (at least 1, at most torch's default).
    OpenMP threads that outnumber the idle cores wait on each other: on a busy 2-core
    machine one eager bf16 backward took 0.2 ms with 1 thread and 168 ms with 2."""
    if requested:
        return requested, "--threads"
    cores = cores or cpu_count()
    default = default or torch.get_num_threads()
    if load_1min is None:
        load = load_average()
        load_1min = load[0] if load else 0.0
    idle = max(1, int(cores - load_1min + 0.5))
    threads = max(1, min(default, idle))
    return threads, (f"load {load_1min:.1f} on {cores} cores leaves {idle} idle; torch default {default}; "
                     f"--threads to override")


def use_cpu_threads(requested: int | None, device: torch.device | str = "cpu") -> str | None:
    """Set torch's threads (and ``OMP_NUM_THREADS`` for child processes) for a command:
    ``requested`` (``--threads``) when given, else on CPU the idle-core choice; on another
    device without ``--threads`` nothing changes. Returns the line to print, or None."""
    if not requested and torch.device(device).type != "cpu":
        return None
    threads, why = choose_cpu_threads(requested)
    os.environ["OMP_NUM_THREADS"] = str(threads)
    torch.set_num_threads(threads)
    return f"torch threads: {threads} ({why})"
