"""``configs/calc.yaml`` (SFT on tool-use demonstrations, then GRPO with the environment's
reward on ``builtin:calc``) for several seeds, summarised as a markdown table: held-out success
(``eval/gold_score``) before and after GRPO, the gain in combined standard errors, tool calls
per trajectory at the first and last GRPO step, wall time of the whole ``launch.py`` run, and
the machine's load average (sampled every 5 s while the run lasts; this task's target is for a
quiet 2-core machine, so a busy one shows as a load well above 2).

    python benchmarks/calc_seeds.py --seeds 0,1,2 [config overrides ...]

The assets (base model and data files, built by ``calc.build_assets`` with its own seed) are
shared by the seeds: ``run.seed`` changes the SFT order and every sample drawn.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from rlhf_dist import metric_keys as K  # noqa: E402


def run_seed(seed: int, overrides: list[str], workdir: Path) -> dict:
    run_dir = workdir / f"seed{seed}"
    loads, done = [os.getloadavg()[0]], threading.Event()

    def sample_load() -> None:
        while not done.wait(5.0):
            loads.append(os.getloadavg()[0])

    sampler = threading.Thread(target=sample_load, daemon=True)
    sampler.start()
    t0 = time.perf_counter()
    try:
        subprocess.run(
            [
                sys.executable,
                str(ROOT / "launch.py"),
                "--config",
                str(ROOT / "configs" / "calc.yaml"),
                f"run.seed={seed}",
                f"run.dir={run_dir}",
                "wandb.enabled=false",
                *overrides,
            ],
            cwd=ROOT,
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    finally:
        wall = time.perf_counter() - t0
        done.set()
        sampler.join()
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if K.GOLD in r]
    steps = [r for r in rows if K.TOOL_CALLS_MEAN in r]
    sft = [r[K.SFT_STEP_TIME] for r in rows if K.SFT_STEP_TIME in r]
    first, last = evals[0], evals[-1]
    se = math.hypot(first[K.GOLD_STDERR], last[K.GOLD_STDERR])
    return {
        "seed": seed,
        "before": (first[K.GOLD], first[K.GOLD_STDERR]),
        "after": (last[K.GOLD], last[K.GOLD_STDERR]),
        "gain_se": (last[K.GOLD] - first[K.GOLD]) / se if se else float("nan"),
        "curve": [round(r[K.GOLD], 3) for r in evals],
        "tools": (steps[0][K.TOOL_CALLS_MEAN], steps[-1][K.TOOL_CALLS_MEAN]),
        "sft_s": sum(sft),
        "grpo_s": steps[-1].get(K.ELAPSED, float("nan")),
        "wall": wall,
        "load": (sum(loads) / len(loads), max(loads)),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--workdir", default="", help="keep the run directories here")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(args.workdir or tmp)
        results = []
        for s in args.seeds.split(","):
            results.append(run_seed(int(s), args.overrides, workdir))
            print(f"done seed {s}: {results[-1]}", file=sys.stderr)
    print(
        "| seed | success before GRPO | after | gain | gold curve | tool calls/traj first -> "
        "last step | SFT steps s | GRPO s | wall time | load (mean, max) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r['seed']} | {r['before'][0]:.3f} ± {r['before'][1]:.3f} "
            f"| {r['after'][0]:.3f} ± {r['after'][1]:.3f} | {r['gain_se']:.1f} SE "
            f"| {' → '.join(map(str, r['curve']))} | {r['tools'][0]:.2f} → {r['tools'][1]:.2f} "
            f"| {r['sft_s']:.0f} | {r['grpo_s']:.0f} | {r['wall'] / 60:.1f} min "
            f"| {r['load'][0]:.1f}, {r['load'][1]:.1f} |"
        )


if __name__ == "__main__":
    main()
