"""The learner's memory and update time with a critic (ppo.estimator=gae) and without (grpo).

    python benchmarks/critic_free_learner.py [--estimators gae,grpo] [--updates 5]
        [--n-layer 6 --n-embd 384 --n-head 6] [--threads 1]

One PPO learner rank in-process (DeepSpeed ZeRO-2, gloo, CPU, fp32), the same job for every
estimator: a locally built GPT-2 policy, 16 prompts x 4 samples of up to 32 tokens, generated
once with a fixed seed and scored by the tiny task's reward function, minibatch 32, micro-batch
8, one epoch. Each estimator runs in a fresh subprocess, so its memory is its own. Printed per
estimator: the engines it built and their parameters, the learner's memory (peak resident
memory from before ``Learner.setup`` to the end of the updates, minus the resident memory
before it: the engines, their optimizer states and the update's activations), and the median
and min time of ``--updates`` PPO updates after one warm-up update.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PROMPTS_PER_STEP, SAMPLES_PER_PROMPT, MAX_NEW_TOKENS = 16, 4, 32


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def measure(estimator: str, assets: Path, updates: int, threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    from rlhf_dist.config import load_config
    from rlhf_dist.roles import Generator, Learner, ReferenceScorer, RewardScorer
    from rlhf_dist.roles.common import free_port
    from rlhf_dist.tasks.tiny import make_prompts

    policy = str(assets / "policy")
    prompts = make_prompts(PROMPTS_PER_STEP, seed=5)
    batch = Generator(policy, max_new_tokens=MAX_NEW_TOKENS).generate(
        prompts, list(range(len(prompts))), samples_per_prompt=SAMPLES_PER_PROMPT, seed=7
    )
    reward = RewardScorer(function="rlhf_dist.tasks.tiny:reward")
    batch.scores = reward.score(batch.prompts, batch.responses)["scores"]
    batch.ref_logprobs = ReferenceScorer(policy).ref_logprobs(batch)["ref_logprobs"]
    cfg = load_config(
        None,
        [
            f"ppo.estimator={estimator}",
            "learner.num_workers=1",
            "rollout.num_workers=1",
            f"rollout.prompts_per_step={PROMPTS_PER_STEP}",
            f"rollout.samples_per_prompt={SAMPLES_PER_PROMPT}",
            f"rollout.max_new_tokens={MAX_NEW_TOKENS}",
            "ppo.minibatch_size=32",
            "ppo.micro_batch_size=8",
        ],
    )

    Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS
    rss_before = _status_kib("VmRSS")
    learner = Learner(cfg, rank=0, world_size=1)
    learner.setup(policy, policy, "127.0.0.1", free_port())
    rss_setup = _status_kib("VmRSS")
    times = []
    for i in range(updates + 1):
        t0 = time.perf_counter()
        metrics = learner.ppo_update(batch, kl_coef=cfg.ppo.kl_coef, seed=i).metrics
        if i:  # the first update is the warm-up
            times.append(time.perf_counter() - t0)
    peak = _status_kib("VmHWM")
    engines = {
        name: sum(p.numel() for p in engine.module.parameters())
        for name, engine in learner.engines().items()
    }
    return {
        "estimator": estimator,
        "engines": engines,
        "setup_mib": (rss_setup - rss_before) / 1024,
        "peak_mib": (peak - rss_before) / 1024,
        "update_s_median": statistics.median(times),
        "update_s_min": min(times),
        "value_metrics": sorted(k for k in metrics if "value" in k or "critic" in k),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--estimators", default="gae,grpo")
    ap.add_argument("--updates", type=int, default=5)
    ap.add_argument("--n-layer", type=int, default=6)
    ap.add_argument("--n-embd", type=int, default=384)
    ap.add_argument("--n-head", type=int, default=6)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--assets", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, Path(args.assets), args.updates, args.threads)))
        return

    from rlhf_dist.tasks.tiny import build_assets

    with tempfile.TemporaryDirectory() as tmp:
        assets = build_assets(
            Path(tmp) / "model", n_layer=args.n_layer, n_embd=args.n_embd, n_head=args.n_head
        )
        rows = []
        for est in args.estimators.split(","):
            cmd = [sys.executable, __file__, "--child", est, "--assets", str(assets)]
            cmd += ["--updates", str(args.updates), "--threads", str(args.threads)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(
        f"# GPT-2 {args.n_layer} layers x {args.n_embd}, {PROMPTS_PER_STEP} prompts x "
        f"{SAMPLES_PER_PROMPT} samples, <= {MAX_NEW_TOKENS} new tokens, ZeRO-2 fp32 CPU, "
        f"{args.threads} thread(s), {args.updates} updates after a warm-up"
    )
    print("| estimator | engines (parameters) | setup MiB | peak MiB | update s (median / min) |")
    print("|---|---|---|---|---|")
    for r in rows:
        engines = ", ".join(f"{k} {v / 1e6:.2f}M" for k, v in r["engines"].items())
        print(
            f"| {r['estimator']} | {engines} | {r['setup_mib']:.0f} | {r['peak_mib']:.0f} | "
            f"{r['update_s_median']:.2f} / {r['update_s_min']:.2f} |"
        )
    for r in rows:
        print(f"# {r['estimator']}: value metrics reported: {r['value_metrics'] or 'none'}")


if __name__ == "__main__":
    main()
