"""Run the torch backend's row blocks on CPU as one parallel region.

The blocked loop of ``_torch_backend`` issues about a dozen small ops per block of rows
(2 MiB). Run with torch's intra-op threads, every op is an OpenMP parallel region that
ends in a barrier, so a call makes thousands of regions; when another process shares a
core, each barrier waits for a descheduled thread (a scheduler time slice, milliseconds)
and a 97 ms call took 6 s (issue 20, item 3; ``benchmarks/busy_cpu.py``). Here the
blocks go instead to ``torch.get_num_threads()`` worker threads whose own ops run
single-threaded, and each worker takes the next block when it is done with one: a
descheduled worker only takes fewer blocks, and the caller waits once, for the last block.

A worker is made single-threaded through OpenMP's per-thread setting
(``omp_set_num_threads`` called in that thread), which leaves the caller's and every
other thread's torch threads alone. Where that is not available (another ATen parallel
backend), or there is one thread or one block, the blocks run in the calling thread.
"""

from __future__ import annotations

import ctypes
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, wait

import torch

# False: run the blocks in order in the calling thread, every op with torch's threads (the
# behaviour before issue 20, item 3); benchmarks/busy_cpu.py times both side by side.
ROW_PARALLEL = True

_lock = threading.Lock()
_pool: tuple[int, int, ThreadPoolExecutor] | None = None  # (pid, workers, executor)
_omp_set_num_threads: Callable[[int], None] | None | bool = False  # False: not looked up yet


def _find_omp_set_num_threads() -> Callable[[int], None] | None:
    if "parallel backend: OpenMP" not in torch.__config__.parallel_info():
        return None
    try:
        return ctypes.CDLL(None).omp_set_num_threads  # torch loads libgomp into the global namespace
    except (AttributeError, OSError):
        return None


def _single_threaded_worker() -> None:
    torch.get_num_threads()  # torch's lazy per-thread init first, or it would override the setting below
    _omp_set_num_threads(1)


def _executor(workers: int) -> ThreadPoolExecutor | None:
    global _pool, _omp_set_num_threads
    with _lock:
        if _omp_set_num_threads is False:
            _omp_set_num_threads = _find_omp_set_num_threads()
        if _omp_set_num_threads is None:
            return None
        # A forked child has none of its parent's threads: start a pool of its own.
        if _pool is None or _pool[0] != os.getpid() or _pool[1] != workers:
            if _pool is not None and _pool[0] == os.getpid():
                _pool[2].shutdown(wait=False)
            _pool = (os.getpid(), workers, ThreadPoolExecutor(
                workers, thread_name_prefix="entropy_gpu-rows", initializer=_single_threaded_worker))
        return _pool[2]


def for_each_block(device: torch.device, n_blocks: int, run_block: Callable[[int, int], None]) -> None:
    """Call ``run_block(block, worker)`` for every ``block`` in ``range(n_blocks)``; ``worker``
    (``0 <= worker < torch.get_num_threads()``) names the worker, for per-worker scratch.
    Blocks must write disjoint outputs. On CPU with several torch threads the blocks run
    concurrently, each single-threaded; otherwise in order in the calling thread."""
    threads = torch.get_num_threads()
    pool = None
    if ROW_PARALLEL and device.type == "cpu" and threads > 1 and n_blocks > 1:
        pool = _executor(threads)
    if pool is None:
        for block in range(n_blocks):
            run_block(block, 0)
        return
    workers = min(threads, n_blocks)
    # Thread-local in torch: carry the caller's (inference tensors may only be written in
    # inference mode).
    grad_enabled, inference = torch.is_grad_enabled(), torch.is_inference_mode_enabled()
    next_block = iter(range(n_blocks))
    take = threading.Lock()

    def work(worker: int) -> None:
        with torch.inference_mode(inference), torch.set_grad_enabled(grad_enabled):
            while True:
                with take:
                    block = next(next_block, None)
                if block is None:
                    return
                run_block(block, worker)

    futures = [pool.submit(work, w) for w in range(workers)]
    wait(futures)  # all of them, even after an error: none may still write once we return
    for future in futures:
        future.result()  # re-raises a worker's exception
