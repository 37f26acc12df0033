"""Entry point: ``python launch.py [--config X.yaml] [--address ADDR] [section.key=value ...]``."""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

from rlhf_dist.config import Config, ConfigError, load_config

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "default.yaml"
WORKER_ENV = {
    "TOKENIZERS_PARALLELISM": "false",
    "TRANSFORMERS_VERBOSITY": "error",
    "RAY_USAGE_STATS_ENABLED": "0",
}


def run_dir_for(cfg: Config) -> Path:
    if cfg.run.dir:
        return Path(cfg.run.dir)
    return Path("runs") / f"{cfg.run.name}-{time.strftime('%Y%m%d-%H%M%S')}"


def init_ray(cfg: Config, address: str) -> bool:
    """Join ``address`` or start a local cluster; returns whether we started it."""
    import ray

    from rlhf_dist.pools import total_cpus

    if ray.is_initialized():
        return False
    env = {"env_vars": dict(WORKER_ENV)}
    if address:
        ray.init(address=address, runtime_env=env)
        return False
    # A laptop cluster gets at least the CPUs the pools ask for: Ray's CPU count is a
    # scheduling budget, and the roles of a small job happily share cores.
    num_cpus = cfg.ray.num_cpus or max(os.cpu_count() or 1, math.ceil(total_cpus(cfg)))
    ray.init(
        num_cpus=num_cpus,
        object_store_memory=cfg.ray.object_store_mb << 20,
        include_dashboard=False,
        runtime_env=env,
    )
    return True


def train(cfg: Config, address: str = "", log=print) -> Path:
    """Run the PPO job described by ``cfg``; returns its run directory."""
    import ray

    from rlhf_dist.orchestrator import Orchestrator
    from rlhf_dist.preflight import resolve_inputs

    inputs = resolve_inputs(cfg)  # bad input fails here, before any actor starts
    run_dir = run_dir_for(cfg)
    started = init_ray(cfg, address or cfg.ray.address)
    orch = None
    try:
        orch = Orchestrator(cfg, inputs, run_dir)
        log(f"run directory: {run_dir}")
        orch.run(log=log)
    finally:
        if orch is not None:
            orch.shutdown()
        if started:
            ray.shutdown()
    return run_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="YAML config file")
    parser.add_argument("--address", default="", help="Ray cluster to join (auto or host:port)")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides")
    args = parser.parse_args(argv)
    for k, v in WORKER_ENV.items():
        os.environ.setdefault(k, v)
    try:
        cfg = load_config(args.config, args.overrides)
        train(cfg, args.address)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    return 0
