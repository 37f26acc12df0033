"""The default job's PPO stage shape, set up for the benchmarks that measure its bookkeeping
(``ledger_cost.py``, ``checkpoint_cost.py``): configs/default.yaml with overrides, a local
Ray cluster, an orchestrator; torn down on exit."""

from __future__ import annotations

import os
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


@contextmanager
def default_job(steps: int, *overrides: str):
    """Yields (orchestrator, work dir) for ``steps`` PPO steps of configs/default.yaml's shape
    (no evaluation, no wandb, no automatic checkpoints) plus ``overrides``."""
    import ray

    from rlhf_dist.config import load_config
    from rlhf_dist.launch import init_ray
    from rlhf_dist.orchestrator import Orchestrator
    from rlhf_dist.preflight import resolve_inputs

    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(
            ROOT / "configs" / "default.yaml",
            [
                "run.stage=ppo",
                f"run.steps={steps}",
                f"run.dir={tmp}/run",
                f"model.assets_dir={tmp}/assets",
                "reward.model=",
                "eval.gold=",
                "checkpoint.every=0",
                "wandb.enabled=false",
                *overrides,
            ],
        )
        started = init_ray(cfg, "")
        orch = Orchestrator(cfg, resolve_inputs(cfg), cfg.run.dir)
        try:
            yield orch, Path(tmp)
        finally:
            orch.shutdown()
            if started:
                ray.shutdown()
