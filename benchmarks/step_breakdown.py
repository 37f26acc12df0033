"""Where a synchronous PPO step spends its time, per block, for a chosen policy size.

    python benchmarks/step_breakdown.py --sizes 1m,10m,30m --steps 6

Runs ``--steps`` synchronous steps on a local Ray cluster (the first is a warm-up and is not
averaged) and prints, per policy size: seconds per block, generated tokens/s, and the
orchestration overhead = step time minus the time the roles spent computing (slowest actor of
each block), as a fraction of step time. Target: overhead <= 10% from 10M parameters up.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from rlhf_dist import metric_keys as K  # noqa: E402

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

# name -> (n_layer, n_embd, n_head) of a GPT-2 on the tiny task's vocabulary
SIZES = {"1m": (4, 128, 4), "10m": (6, 384, 6), "30m": (10, 512, 8)}
BLOCKS = [*K.STEP_BLOCKS, "step"]  # time/<block> each


def run_size(name: str, steps: int, overrides: list[str], workdir: Path) -> dict:
    import ray

    from rlhf_dist.config import load_config
    from rlhf_dist.launch import init_ray
    from rlhf_dist.orchestrator import Orchestrator
    from rlhf_dist.preflight import resolve_inputs
    from rlhf_dist.tasks.tiny import build_assets

    n_layer, n_embd, n_head = SIZES[name]
    assets = build_assets(workdir / name, n_layer=n_layer, n_embd=n_embd, n_head=n_head)
    cfg = load_config(
        None,
        [
            f"model.policy={assets / 'policy'}",
            f"data.prompts={assets / 'prompts.jsonl'}",
            f"run.steps={steps}",
            "rollout.num_workers=2",
            "rollout.prompts_per_step=16",
            "rollout.max_new_tokens=32",
            "learner.num_workers=1",
            "ppo.minibatch_size=16",
            "ppo.micro_batch_size=8",
            *overrides,
        ],
    )
    started = init_ray(cfg, "")
    orch = Orchestrator(cfg, resolve_inputs(cfg), workdir / f"run-{name}")
    try:
        params = ray.get(orch.learners.actors[0].setup_info.remote())["policy_params"]
        rows = orch.run(log=lambda _: None)[1:]  # drop the warm-up step
    finally:
        orch.shutdown()
        if started:
            ray.shutdown()
    out = {"params": params}
    for b in BLOCKS:
        out[b] = statistics.mean(r[K.time_key(b)] for r in rows)
    out["tokens/s"] = statistics.mean(r[K.TOKENS_PER_S] for r in rows)
    out["overhead"] = statistics.mean(r[K.OVERHEAD_FRAC] for r in rows)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--sizes", default="1m,10m,30m", help=f"comma list of {list(SIZES)}")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("overrides", nargs="*", help="config overrides, e.g. learner.num_workers=2")
    args = ap.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as d:
        for name in args.sizes.split(","):
            results[name] = run_size(name, args.steps, args.overrides, Path(d))
            print(f"done {name}", file=sys.stderr)
    head = ["policy", "params"] + [f"{b} s" for b in BLOCKS] + ["tokens/s", "overhead"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for name, r in results.items():
        cells = [name, f"{r['params'] / 1e6:.1f}M"] + [f"{r[b]:.3f}" for b in BLOCKS]
        cells += [f"{r['tokens/s']:.0f}", f"{100 * r['overhead']:.1f}%"]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
