"""Does a run learn the same with vLLM generators as with HF ones? ``configs/grpo.yaml`` (SFT ->
GRPO on builtin:arith) with ``rollout.engine=hf`` and ``rollout.engine=vllm``, seed by seed,
one after the other in one invocation (so both see the same machine):

    python benchmarks/engine_learning.py [--seeds 0,1] [--engines hf,vllm] [overrides ...]

Printed per engine and seed: held-out accuracy (``eval/gold_score``, 512 prompts) of the SFT
policy and after GRPO, the gain in standard errors, the largest engine/trainer log-prob
difference seen (``rollout/logprob_diff_max``), the median step time and the wall time.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from rlhf_dist import metric_keys as K  # noqa: E402


def run(engine: str, seed: int, overrides: list[str], workdir: Path) -> dict:
    run_dir = workdir / f"{engine}-seed{seed}"
    t0 = time.perf_counter()
    subprocess.run(
        [
            sys.executable,
            str(ROOT / "launch.py"),
            "--config",
            "configs/grpo.yaml",
            f"rollout.engine={engine}",
            f"run.seed={seed}",
            f"run.dir={run_dir}",
            "wandb.enabled=false",
            *overrides,
        ],
        cwd=ROOT,
        check=True,
        stdout=subprocess.DEVNULL,
    )
    wall = time.perf_counter() - t0
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if K.GOLD in r]
    steps = [r for r in rows if K.STEP_TIME in r]
    first, last = evals[0], evals[-1]
    se = math.hypot(first[K.GOLD_STDERR], last[K.GOLD_STDERR])
    return {
        "engine": engine,
        "seed": seed,
        "before": (first[K.GOLD], first[K.GOLD_STDERR]),
        "after": (last[K.GOLD], last[K.GOLD_STDERR]),
        "gain_se": (last[K.GOLD] - first[K.GOLD]) / se,
        "diff_max": max(r.get(K.LOGPROB_DIFF_MAX, 0.0) for r in steps),
        "step": statistics.median(r[K.STEP_TIME] for r in steps),
        "wall": wall,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--engines", default="hf,vllm")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as d:
        for s in args.seeds.split(","):
            for engine in args.engines.split(","):
                results.append(run(engine, int(s), args.overrides, Path(d)))
                print(f"done {engine} seed {s}", file=sys.stderr)
    print(
        "| engine | seed | gold: SFT policy | gold: after GRPO | gain | logprob_diff_max "
        "| step time (median) | wall time |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r['engine']} | {r['seed']} | {r['before'][0]:.3f} ± {r['before'][1]:.3f} "
            f"| {r['after'][0]:.3f} ± {r['after'][1]:.3f} | {r['gain_se']:+.1f} SE "
            f"| {r['diff_max']:.1e} | {r['step']:.2f} s | {r['wall']:.0f} s |"
        )


if __name__ == "__main__":
    main()
