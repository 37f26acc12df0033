"""Memory per role of a run on one node, after a few steps: each actor's peak resident size, its
resident size now, its proportional share (PSS: pages it shares with other processes, such as
a model file's mapped pages or a shared-memory weight slot, are charged 1/N to each of the N
processes mapping them) and the pages only it maps (USS). The node's sum of PSS against its sum
of RSS is what sharing saves.

    python benchmarks/role_memory.py [--config configs/smollm2-grpo.yaml] [--variants full,lora]
        [--steps 2] [overrides ...]

``full`` runs the config as it is; ``lora`` adds ``model.lora_rank=16 learner.lr=2e-4`` (what
the config's header names). Each variant runs on a local Ray cluster of its own.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

VARIANTS = {"full": [], "lora": ["model.lora_rank=16", "learner.lr=2e-4"]}


def measure(config: str, variant: str, steps: int, overrides: list[str], workdir: Path) -> list:
    import ray

    from rlhf_dist.config import load_config
    from rlhf_dist.launch import init_ray
    from rlhf_dist.orchestrator import Orchestrator
    from rlhf_dist.preflight import resolve_inputs

    run_dir = workdir / variant
    cfg = load_config(
        ROOT / config,
        [
            f"run.dir={run_dir}",
            "run.stage=ppo",
            f"run.steps={steps}",
            "eval.every=1000000",
            "wandb.enabled=false",
            *VARIANTS[variant],
            *overrides,
        ],
    )
    init_ray(cfg, "")  # a local cluster of our own, sized by ray.num_cpus where given
    rows = []
    try:
        orch = Orchestrator(cfg, resolve_inputs(cfg), run_dir)
        try:
            for _ in range(steps):
                orch.step()
            pools = {"learner": orch.learners.pool, "rollout": orch.generators.pool}
            pools.update({p.name: p for p in orch.scorers.pools})
            for name, pool in pools.items():
                for i, mem in enumerate(ray.get(pool.call("memory"))):
                    rows.append({"variant": variant, "role": f"{name} {i}", **mem})
        finally:
            orch.shutdown()
    finally:
        ray.shutdown()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--config", default="configs/smollm2-grpo.yaml")
    ap.add_argument("--variants", default="full,lora")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as d:
        for variant in args.variants.split(","):
            rows += measure(args.config, variant, args.steps, args.overrides, Path(d))
            print(f"done {variant}", file=sys.stderr)
    print("| variant | role | peak RSS | RSS | PSS | USS |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['variant']} | {r['role']} | {r['peak_rss']:.0f} MiB | {r['rss']:.0f} MiB "
            f"| {r['pss']:.0f} MiB | {r['uss']:.0f} MiB |"
        )
    print()
    print("| variant | sum of RSS | sum of PSS (the node's real use) | shared, counted once |")
    print("|---|---|---|---|")
    for variant in args.variants.split(","):
        mine = [r for r in rows if r["variant"] == variant]
        rss, pss = sum(r["rss"] for r in mine), sum(r["pss"] for r in mine)
        print(f"| {variant} | {rss:.0f} MiB | {pss:.0f} MiB | {rss - pss:.0f} MiB |")


if __name__ == "__main__":
    main()
