"""The default job (``python launch.py``: SFT -> reward model -> PPO on the built-in task)
for several seeds, summarised as a table: gold score before and after PPO on held-out prompts,
the gain in standard errors, reward-model held-out accuracy, final KL, wall time.

    python benchmarks/recipe_seeds.py --seeds 0,1,2 [config overrides ...]
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_seed(seed: int, overrides: list[str], workdir: Path) -> dict:
    run_dir = workdir / f"seed{seed}"
    t0 = time.perf_counter()
    subprocess.run(
        [
            sys.executable,
            str(ROOT / "launch.py"),
            f"run.seed={seed}",
            f"run.dir={run_dir}",
            *overrides,
        ],
        cwd=ROOT,
        check=True,
        stdout=subprocess.DEVNULL,
    )
    wall = time.perf_counter() - t0
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval/gold_score" in r]
    rm = [r for r in rows if "rm/eval_accuracy" in r]
    ppo = [r for r in rows if "train/kl" in r]
    first, last = evals[0], evals[-1]
    se = math.hypot(first["eval/gold_score_stderr"], last["eval/gold_score_stderr"])
    return {
        "seed": seed,
        "gold_sft": (first["eval/gold_score"], first["eval/gold_score_stderr"]),
        "gold_final": (last["eval/gold_score"], last["eval/gold_score_stderr"]),
        "gain_se": (last["eval/gold_score"] - first["eval/gold_score"]) / se,
        "rm_acc": rm[-1]["rm/eval_accuracy"],
        "kl": ppo[-1]["train/kl"],
        "wall": wall,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        results = []
        for s in args.seeds.split(","):
            results.append(run_seed(int(s), args.overrides, Path(d)))
            print(f"done seed {s}", file=sys.stderr)
    print(
        "| seed | gold: SFT policy | gold: after PPO | gain | RM held-out accuracy | final KL/token | wall time |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r['seed']} | {r['gold_sft'][0]:.3f} ± {r['gold_sft'][1]:.3f} "
            f"| {r['gold_final'][0]:.3f} ± {r['gold_final'][1]:.3f} | {r['gain_se']:.1f} SE "
            f"| {r['rm_acc']:.3f} | {r['kl']:.3f} | {r['wall'] / 60:.1f} min |"
        )


if __name__ == "__main__":
    main()
