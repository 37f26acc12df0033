"""Ray environment settings that ``launch`` (the driver) and ``submit`` (the job client) share.

A module of its own, importing nothing of the project, so that neither of them has to import
the other for them.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, MutableMapping

# Set for the driver process and, through ray.init(runtime_env=...), for every worker.
WORKER_ENV = {
    "TOKENIZERS_PARALLELISM": "false",
    "TRANSFORMERS_VERBOSITY": "error",
    "RAY_USAGE_STATS_ENABLED": "0",
}
# Every worker in mode=async only, where generation and training compute at once on the same
# cores: OpenMP threads sleep while they wait instead of spinning. Two spinning two-thread torch
# processes on two cores took 20-820 ms per training step of a tiny GPT-2 against 12 ms with
# PASSIVE. In mode=sync the blocks take turns and a worker's threads have their cores, so
# libgomp's default (spin, then sleep) stays: PASSIVE made a lone two-thread step 2.3x slower
# (7.6 -> 17.9 ms) and the system's train block 1.45x slower at 10m
# (docs/cluster.md#threads-and-openmp). A value in the driver's environment wins in both modes.
ASYNC_ENV = {"OMP_WAIT_POLICY": "PASSIVE"}
# Job-level environment (``launch.py --submit``). The workers' keys must stay out: Ray refuses
# to merge a job's runtime_env with the driver's ray.init(runtime_env=...) when env keys clash.
JOB_ENV = {"PYTHONUNBUFFERED": "1"}
# every key launch.py may set for the workers
WORKER_KEYS = frozenset({*WORKER_ENV, *ASYNC_ENV})
assert not set(JOB_ENV) & WORKER_KEYS, "JOB_ENV and the workers' keys must not overlap"


def worker_env(mode: str = "sync", environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """Every worker's environment variables for a run in ``mode``: WORKER_ENV, and ASYNC_ENV in
    ``async`` mode; each value as ``environ`` has it where it sets it, and ASYNC_ENV's keys
    whatever the mode where ``environ`` sets them."""
    env = {**WORKER_ENV, **(ASYNC_ENV if mode == "async" else {})}
    env.update({k: environ[k] for k in ASYNC_ENV if k in environ})
    return {k: environ.get(k, v) for k, v in env.items()}


def worker_runtime_env(mode: str = "sync") -> dict[str, dict[str, str]]:
    """The ``runtime_env`` for ``ray.init`` of a run in ``mode`` (a fresh dict)."""
    return {"env_vars": worker_env(mode)}


def set_driver_env(environ: MutableMapping[str, str] = os.environ) -> None:
    """WORKER_ENV in this process too, where the caller's environment does not say otherwise."""
    for key, value in WORKER_ENV.items():
        environ.setdefault(key, value)
