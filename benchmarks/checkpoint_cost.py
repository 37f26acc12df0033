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
import statistics
import time

from default_job import default_job


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6)
    args = parser.parse_args()
    overrides = (
        "model.policy=builtin:describe",
        "reward.function=rlhf_dist.tasks.lang:gold_reward",
        "checkpoint.keep=1",
    )
    step_s, save_s = [], []
    with default_job(args.steps, *overrides) as (orch, _):
        for out in orch.loop.steps():
            orch.record(out)
            t0 = time.perf_counter()
            orch.save_checkpoint()
            if orch.state.step > 1:  # the first step warms up
                save_s.append(time.perf_counter() - t0)
                step_s.append(out.step_time)
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
