"""What checkpoints cost, and what a lost learner rank then costs: the checkpoint interval
trade-off, measured in one run.

    python benchmarks/checkpoint_cost.py --steps 6

Runs the default job's PPO stage shape (configs/default.yaml: the built-in describe model as
policy and critic, 64 prompts per step, 24 new tokens, two PPO epochs; a rule reward instead
of the trained reward model, no evaluation) and, after each step, times one checkpoint save
(engines of policy and critic with their optimizer states, and the run state). Prints the
median step and save times, and for each ``checkpoint.every``: the share of run time spent
saving, and the steps a learner loss redoes (on average half an interval, at most a whole one).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def main() -> None:
    import ray

    from rlhf_dist.config import load_config
    from rlhf_dist.launch import init_ray
    from rlhf_dist.orchestrator import Orchestrator
    from rlhf_dist.preflight import resolve_inputs

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6)
    args = parser.parse_args()
    root = Path(__file__).resolve().parent.parent
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(
            root / "configs" / "default.yaml",
            [
                "run.stage=ppo",
                f"run.steps={args.steps}",
                f"run.dir={tmp}/run",
                "model.policy=builtin:describe",
                f"model.assets_dir={tmp}/assets",
                "reward.model=",
                "reward.function=rlhf_dist.tasks.lang:gold_reward",
                "eval.gold=",
                "checkpoint.every=0",
                "checkpoint.keep=1",
                "wandb.enabled=false",
            ],
        )
        started = init_ray(cfg, "")
        orch = Orchestrator(cfg, resolve_inputs(cfg), cfg.run.dir)
        step_s, save_s = [], []
        try:
            for out in orch.loop.steps():
                orch.record(out)
                t0 = time.perf_counter()
                orch.save_checkpoint()
                if orch.state.step > 1:  # the first step warms up
                    save_s.append(time.perf_counter() - t0)
                    step_s.append(out.step_time)
        finally:
            orch.shutdown()
            if started:
                ray.shutdown()
    step, save = statistics.median(step_s), statistics.median(save_s)
    print(f"median step {step:.2f} s, median checkpoint save {save:.2f} s\n")
    print(
        "| checkpoint.every | time spent saving | steps redone after a learner loss (mean / max) |"
    )
    print("|---|---|---|")
    for every in (1, 2, 5, 10, 20):
        share = save / (every * step + save)
        print(f"| {every} | {share:.1%} | {every / 2:g} / {every} |")


if __name__ == "__main__":
    main()
