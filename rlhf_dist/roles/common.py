"""Small helpers shared by the roles (no ray)."""

from __future__ import annotations

import socket
import threading

import torch


def pick_device(num_gpus: float) -> torch.device:
    if num_gpus > 0:
        if not torch.cuda.is_available():
            raise RuntimeError("num_gpus > 0 but CUDA is not available in this worker")
        return torch.device("cuda", 0)  # Ray exposes the worker's GPU as device 0
    return torch.device("cpu")


def free_port() -> int:
    """A port that was free a moment ago. Another process may take it before the caller binds
    it: the roles host their stores with ``host_store`` instead; this is for in-process
    callers (benchmarks) that pass a port to a store opened later."""
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


class SystemStats:
    """Per-role resource use, gathered by the orchestrator for monitoring."""

    def system_stats(self) -> dict:
        import psutil

        proc = psutil.Process()
        out = {
            "rss_mb": proc.memory_info().rss / 2**20,
            "cpu_percent": proc.cpu_percent(interval=None),  # since the previous call
        }
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            out["gpu_mem_mb"] = torch.cuda.max_memory_allocated() / 2**20
            out["gpu_util_percent"] = float(torch.cuda.utilization())
        return out

    def memory(self) -> dict:
        """``memory_now()`` of this role's process (``benchmarks/role_memory.py``)."""
        return memory_now()


def memory_now() -> dict:
    """This process's memory (MiB): resident (``rss``), its proportional share of pages it
    shares with other processes (``pss``: N processes mapping one copy of a file or a
    shared-memory region are charged 1/N each), the pages only it maps (``uss``), and its peak
    resident size (``peak_rss``)."""
    import resource

    import psutil

    m = psutil.Process().memory_full_info()
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return {
        "rss": m.rss / 2**20,
        "pss": getattr(m, "pss", m.rss) / 2**20,
        "uss": m.uss / 2**20,
        "peak_rss": peak_kb / 2**10,
    }


def in_threads(*calls, timeout: float = 120.0) -> list:
    """Run the calls of several members of one collective group at once, one thread each (a
    learner and a generator joining a weight-sync group in-process, say); their results in
    order, or the first error. A call still running after ``timeout`` seconds raises."""
    results, errors = [None] * len(calls), []

    def run(i, fn):
        try:
            results[i] = fn()
        except BaseException as e:  # re-raised below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i, c), daemon=True) for i, c in enumerate(calls)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=timeout)
    if any(t.is_alive() for t in threads):
        raise TimeoutError(f"a collective call did not return within {timeout:.0f} s")
    if errors:
        raise errors[0]
    return results
