"""What the sample ledger costs: its work per step against the step time, in the same run.

    python benchmarks/ledger_cost.py --steps 8

Runs the default job's PPO shape (configs/default.yaml: 64 prompts per step, 24 new tokens,
two generators, two PPO epochs) on the built-in tiny policy with the ledger off in the
orchestrator, and after each step builds and writes that step's ledger lines exactly as
``Orchestrator.record`` does, timed. The tiny policy makes steps shorter than the default
job's, so the share printed is an upper bound. Target (issue #18): <= 2% of step time.
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
    from rlhf_dist.ledger import SampleLedger, data_epochs, ledger_rows
    from rlhf_dist.orchestrator import Orchestrator
    from rlhf_dist.preflight import resolve_inputs

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    args = parser.parse_args()
    root = Path(__file__).resolve().parent.parent
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(
            root / "configs" / "default.yaml",
            [
                "run.stage=ppo",
                f"run.steps={args.steps}",
                f"run.dir={tmp}/run",
                "run.ledger=false",
                "model.policy=builtin:tiny",
                f"model.assets_dir={tmp}/assets",
                "data.prompts=builtin:tiny",
                "reward.model=",
                "eval.gold=",
                "checkpoint.every=0",
                "wandb.enabled=false",
            ],
        )
        started = init_ray(cfg, "")
        orch = Orchestrator(cfg, resolve_inputs(cfg), cfg.run.dir)
        (Path(tmp) / "ledger").mkdir()
        book = SampleLedger(Path(tmp) / "ledger", len(orch.inputs.prompts), 1)
        share, ledger_ms, step_s = [], [], []
        try:
            for out in orch.loop.steps():
                t0 = time.perf_counter()
                pos = out.data_position["cursor"]
                epochs = data_epochs(pos, orch.state.cursor.size, cfg.rollout.prompts_per_step)
                book.write(ledger_rows(orch.state.step, out.batch, epochs, orch.state.version - 1))
                spent = time.perf_counter() - t0
                orch.record(out)
                if orch.state.step > 1:  # the first step warms up
                    share.append(spent / out.step_time)
                    ledger_ms.append(spent * 1e3)
                    step_s.append(out.step_time)
        finally:
            orch.shutdown()
            if started:
                ray.shutdown()
    print(
        "| samples/step | step s (median) | ledger ms/step (median) | share (median) | share (max) |"
    )
    print("|---|---|---|---|---|")
    print(
        f"| {cfg.rollout.prompts_per_step * cfg.rollout.samples_per_prompt} "
        f"| {statistics.median(step_s):.3f} | {statistics.median(ledger_ms):.2f} "
        f"| {statistics.median(share):.2%} | {max(share):.2%} |"
    )


if __name__ == "__main__":
    main()
