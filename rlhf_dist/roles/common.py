"""Small helpers shared by the roles (no ray)."""

from __future__ import annotations

import socket

import torch


def pick_device(num_gpus: float) -> torch.device:
    if num_gpus > 0:
        if not torch.cuda.is_available():
            raise RuntimeError("num_gpus > 0 but CUDA is not available in this worker")
        return torch.device("cuda", 0)  # Ray exposes the worker's GPU as device 0
    return torch.device("cpu")


def free_port() -> int:
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


class WeightSyncMember(SystemStats):
    """What every member of the weight-sync group shares: the group and its version."""

    sync_group = None
    version: int = 0

    def free_port(self) -> int:
        return free_port()
