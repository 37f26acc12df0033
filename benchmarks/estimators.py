"""The advantage estimators side by side on the verifiable task (builtin:arith), same budget.

    python benchmarks/estimators.py [--estimators gae,grpo,rloo,reinforce_pp] [--seeds 0]
        [--steps 60] [--eval-every 20]

One SFT policy (configs/arith.yaml's SFT stage, trained once per seed), then for each estimator
a PPO stage through ``launch.py`` on a local Ray cluster from that policy with the same sample
budget: ``--steps`` steps of 32 prompts x 4 samples, the same learning rate, held-out accuracy
(``eval/gold_score`` on 512 held-out prompts) every ``--eval-every`` steps. The estimators run
one after another, seed by seed, in one invocation, so that they share the machine's state.
Per estimator:

- ``gae``: configs/arith.yaml as it is (a critic, KL 0.02 in the reward);
- ``grpo``, ``rloo``: configs/grpo.yaml (no critic; k3 KL 0.02 as a loss term, none in the
  reward; each prompt's 4 samples form a group);
- ``reinforce_pp``: configs/grpo.yaml with the estimator's own KL: 0.02 per token in the reward
  (Hu 2025), none as a loss term; returns whitened over the batch.

Printed: accuracy against samples trained and against wall time (seconds since the PPO stage
started, evaluation included), then per estimator the median step time (``time/step``), the
learner's peak resident memory (``pool/learner_rss_mb``) and the accuracy gain in standard
errors. With several seeds, each cell is the mean over seeds.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from rlhf_dist import metric_keys as K  # noqa: E402

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

PROMPTS, SAMPLES = 32, 4
ESTIMATOR_ARGS = {
    "gae": ["--config", "configs/arith.yaml"],
    "grpo": ["--config", "configs/grpo.yaml"],
    "dr_grpo": ["--config", "configs/grpo.yaml", "ppo.estimator=dr_grpo"],
    "rloo": ["--config", "configs/grpo.yaml", "ppo.estimator=rloo"],
    "reinforce_pp": [
        "--config",
        "configs/grpo.yaml",
        "ppo.estimator=reinforce_pp",
        "ppo.kl_coef=0.02",
        "ppo.kl_loss_coef=0",
    ],
    "reinforce_pp_baseline": [
        "--config",
        "configs/grpo.yaml",
        "ppo.estimator=reinforce_pp_baseline",
        "ppo.kl_coef=0.02",
        "ppo.kl_loss_coef=0",
    ],
}


def launch(args: list[str], log: Path) -> None:
    with log.open("w") as f:
        p = subprocess.run(
            [sys.executable, str(ROOT / "launch.py"), *args, "wandb.enabled=false"],
            cwd=ROOT,
            stdout=f,
            stderr=subprocess.STDOUT,
        )
    if p.returncode:
        tail = log.read_text()[-3000:]
        raise SystemExit(f"launch.py {' '.join(args)} failed (log {log}):\n{tail}")


def sft(work: Path, seed: int) -> Path:
    run = work / f"sft-{seed}"
    args = ["--config", "configs/arith.yaml", "run.stage=sft", f"run.dir={run}"]
    launch(
        [*args, f"model.assets_dir={work / 'assets'}", f"run.seed={seed}"], run.with_suffix(".log")
    )
    return run / "sft" / "policy"


def ppo(work: Path, estimator: str, seed: int, policy: Path, steps: int, every: int) -> dict:
    run = work / f"{estimator}-{seed}"
    launch(
        [
            *ESTIMATOR_ARGS[estimator],
            "run.stage=ppo",
            f"run.dir={run}",
            f"run.seed={seed}",
            f"model.policy={policy}",
            f"run.steps={steps}",
            f"eval.every={every}",
            f"rollout.prompts_per_step={PROMPTS}",
            f"rollout.samples_per_prompt={SAMPLES}",
            "checkpoint.every=0",
        ],
        run.with_suffix(".log"),
    )
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if r["stage"] == "ppo"]
    evals = [r for r in rows if K.GOLD in r]
    steps_rows = [r for r in rows if r["step"] > 0 and K.STEP_TIME in r]
    return {
        "eval_steps": [r["step"] for r in evals],
        "gold": [r[K.GOLD] for r in evals],
        "stderr": [r[K.GOLD_STDERR] for r in evals],
        "elapsed": [r.get(K.ELAPSED, 0.0) for r in evals],
        "step_s": statistics.median(r[K.STEP_TIME] for r in steps_rows),
        "learner_mb": max(r[K.pool_key("learner", "rss_mb")] for r in steps_rows),
        "value_metrics": any(K.VALUE_LOSS in r for r in steps_rows),
    }


def mean(xs) -> float:
    return sum(xs) / len(xs)


def table(results: dict[str, list[dict]]) -> list[str]:
    first = next(iter(results.values()))[0]
    cols = first["eval_steps"]
    out = ["Held-out accuracy against samples trained:", ""]
    out.append(
        "| estimator | " + " | ".join(f"{s * PROMPTS * SAMPLES} samples" for s in cols) + " |"
    )
    out.append("|---" * (len(cols) + 1) + "|")
    for est, runs in results.items():
        cells = [f"{mean([r['gold'][i] for r in runs]):.3f}" for i in range(len(cols))]
        out.append(f"| {est} | " + " | ".join(cells) + " |")
    out += ["", "Held-out accuracy against wall time (s since the PPO stage started):", ""]
    out.append("| estimator | " + " | ".join(f"step {s}" for s in cols) + " |")
    out.append("|---" * (len(cols) + 1) + "|")
    for est, runs in results.items():
        cells = [
            f"{mean([r['gold'][i] for r in runs]):.3f} @ {mean([r['elapsed'][i] for r in runs]):.0f} s"
            for i in range(len(cols))
        ]
        out.append(f"| {est} | " + " | ".join(cells) + " |")
    out += ["", "| estimator | step time (median) | learner peak RSS | value metrics | gain |"]
    out.append("|---|---|---|---|---|")
    for est, runs in results.items():
        gains = []
        for r in runs:
            se = math.sqrt(r["stderr"][0] ** 2 + r["stderr"][-1] ** 2)
            gains.append((r["gold"][-1] - r["gold"][0]) / se)
        out.append(
            f"| {est} | {mean([r['step_s'] for r in runs]):.3f} s "
            f"| {mean([r['learner_mb'] for r in runs]):.0f} MB "
            f"| {'yes' if runs[0]['value_metrics'] else 'no'} "
            f"| {mean([r['gold'][-1] - r['gold'][0] for r in runs]):+.3f} "
            f"({mean(gains):.1f} SE) |"
        )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--estimators", default="gae,grpo,rloo,reinforce_pp")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--eval-every", type=int, default=20)
    ap.add_argument("--work", default="", help="keep the runs here (default: a temp dir)")
    args = ap.parse_args()
    estimators = args.estimators.split(",")
    unknown = [e for e in estimators if e not in ESTIMATOR_ARGS]
    if unknown:
        raise SystemExit(f"--estimators: unknown {unknown}; known: {list(ESTIMATOR_ARGS)}")
    results: dict[str, list[dict]] = {e: [] for e in estimators}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        for seed in (int(s) for s in args.seeds.split(",")):
            policy = sft(work, seed)
            for est in estimators:
                r = ppo(work, est, seed, policy, args.steps, args.eval_every)
                results[est].append(r)
                print(
                    f"seed {seed} {est}: accuracy {r['gold'][0]:.3f} -> {r['gold'][-1]:.3f}, "
                    f"step {r['step_s']:.3f} s",
                    flush=True,
                )
    print(f"\n{args.steps} steps of {PROMPTS} prompts x {SAMPLES} samples, seeds {args.seeds}\n")
    print("\n".join(table(results)))


if __name__ == "__main__":
    main()
