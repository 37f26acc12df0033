"""Ray environment settings that ``launch`` (the driver) and ``submit`` (the job client) share.

A module of its own, importing nothing of the project, so that neither of them has to import
the other for them.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping

# Set for the driver process and, through ray.init(runtime_env=...), for every worker.
WORKER_ENV = {
    "TOKENIZERS_PARALLELISM": "false",
    "TRANSFORMERS_VERBOSITY": "error",
    "RAY_USAGE_STATS_ENABLED": "0",
    # OpenMP threads sleep while they wait instead of spinning: with libgomp's spinning
    # default, a two-thread actor on cores other processes also use ran the tiny policy's
    # generate 20-40x slower (2.1-4.5 s against 0.04-0.14 s; benchmarks/vs_trl.py's notes)
    "OMP_WAIT_POLICY": "PASSIVE",
}
# Job-level environment (``launch.py --submit``). Keys of WORKER_ENV must stay out: Ray refuses
# to merge a job's runtime_env with the driver's ray.init(runtime_env=...) when env keys clash.
JOB_ENV = {"PYTHONUNBUFFERED": "1"}
assert not set(JOB_ENV) & set(WORKER_ENV), "JOB_ENV and WORKER_ENV must not share keys"


def worker_runtime_env() -> dict[str, dict[str, str]]:
    """The ``runtime_env`` for ``ray.init``: WORKER_ENV for every worker (a fresh dict), each
    value as this process has it where it sets it."""
    return {"env_vars": {k: os.environ.get(k, v) for k, v in WORKER_ENV.items()}}


def set_driver_env(environ: MutableMapping[str, str] = os.environ) -> None:
    """WORKER_ENV in this process too, where the caller's environment does not say otherwise."""
    for key, value in WORKER_ENV.items():
        environ.setdefault(key, value)
