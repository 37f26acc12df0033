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
import statistics
import time

from default_job import default_job


def main() -> None:
    from rlhf_dist.ledger import SampleLedger, data_epochs, ledger_rows

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    args = parser.parse_args()
    overrides = ("run.ledger=false", "model.policy=builtin:tiny", "data.prompts=builtin:tiny")
    with default_job(args.steps, *overrides) as (orch, tmp):
        cfg = orch.cfg
        (tmp / "ledger").mkdir()
        book = SampleLedger(tmp / "ledger", len(orch.inputs.prompts), 1)
        share, ledger_ms, step_s = [], [], []
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
