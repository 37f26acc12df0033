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
sys.path.insert(0, str(ROOT))
from rlhf_dist import metric_keys as K  # noqa: E402


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
    evals = [r for r in rows if K.GOLD in r]
    rm = [r for r in rows if K.RM_EVAL_ACCURACY in r]
    ppo = [r for r in rows if K.KL in r]
    first, last = evals[0], evals[-1]
    se = math.hypot(first[K.GOLD_STDERR], last[K.GOLD_STDERR])
    return {
        "seed": seed,
        "gold_sft": (first[K.GOLD], first[K.GOLD_STDERR]),
        "gold_final": (last[K.GOLD], last[K.GOLD_STDERR]),
        "gain_se": (last[K.GOLD] - first[K.GOLD]) / se,
        "rm_acc": rm[-1][K.RM_EVAL_ACCURACY],
        "kl": ppo[-1][K.KL],
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
