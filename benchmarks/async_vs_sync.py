"""The built-in task's PPO stage in synchronous and asynchronous mode, side by side in one run.

    python benchmarks/async_vs_sync.py --steps 30 --staleness 1 [config overrides ...]

SFT and the reward model are trained once (``launch.py run.stage=sft``, then ``rm``, default
config); each mode then runs the PPO stage from those same models in a copy of that run
directory (``run.stage=ppo``), as a ``launch.py`` subprocess on its own local Ray cluster.
The pools are sized so that overlap can pay on 2 cores: one generator and one learner rank,
one thread each (``num_cpus=1``), so in synchronous mode one core idles while the other
generates or trains.

The two modes run ``--repeats`` times each, alternating; a mode's row is its run with the
median samples/s, and the target is judged on the median of the per-pair ratios.

Printed per mode: samples/s over the PPO steps (trained samples / summed step time, the gold
evaluations left out), median step time, generate and train time per step (sync mode: the
blocks; async mode: the time the learner trained and the largest staleness), and the gold score
at each evaluation against the seconds since PPO started. Target: async >= 1.5x sync's
samples/s where generation and training take similar time, with a final gold score within
noise (2 combined standard errors) of sync's.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from rlhf_dist import metric_keys as K  # noqa: E402

TARGET = 1.5
POOLS = [
    "rollout.num_workers=1",
    "rollout.num_cpus=1",
    "learner.num_cpus=1",
    "reward.num_cpus=0.25",
    "reference.num_cpus=0.25",
    "wandb.enabled=false",
    "checkpoint.every=0",
]


def launch(run_dir: Path, *overrides: str) -> float:
    t0 = time.perf_counter()
    subprocess.run(
        [sys.executable, str(ROOT / "launch.py"), f"run.dir={run_dir}", *overrides],
        cwd=ROOT,
        check=True,
        stdout=subprocess.DEVNULL,
    )
    return time.perf_counter() - t0


def ppo_rows(run_dir: Path) -> list[dict]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r.get("stage") == "ppo"]


def summarise(rows: list[dict]) -> dict:
    steps = [r for r in rows if K.STEP_TIME in r]
    evals = [r for r in rows if K.GOLD in r]
    busy = sum(r[K.STEP_TIME] for r in steps)
    return {
        "samples/s": sum(r[K.SAMPLES_PER_S] * r[K.STEP_TIME] for r in steps) / busy,
        "step": statistics.median(r[K.STEP_TIME] for r in steps),
        "generate": statistics.median(r.get(K.TIME_GENERATE, math.nan) for r in steps),
        "train": statistics.median(r[K.TIME_TRAIN] for r in steps),
        "staleness": max(r[K.STALENESS_MAX] for r in steps),
        "evals": [(r[K.ELAPSED], r["step"], r[K.GOLD], r[K.GOLD_STDERR]) for r in evals],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--steps", type=int, default=30, help="PPO steps per mode")
    ap.add_argument("--staleness", type=int, default=1, help="async.max_staleness")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=2, help="runs per mode, alternating")
    ap.add_argument("overrides", nargs="*", help="config overrides for both modes")
    args = ap.parse_args()
    common = [f"run.seed={args.seed}", *POOLS, *args.overrides]
    modes = {
        "sync": ["mode=sync"],
        "async": ["mode=async", f"async.max_staleness={args.staleness}"],
    }
    runs: dict[str, list] = {mode: [] for mode in modes}
    with tempfile.TemporaryDirectory() as d:
        base = Path(d) / "base"
        for stage in ("sft", "rm"):
            print(f"training {stage} once for both modes", file=sys.stderr, flush=True)
            launch(base, f"run.stage={stage}", *common)
        for k in range(args.repeats):
            for mode, extra in modes.items():  # alternating: drift in load hits both
                run_dir = Path(d) / f"{mode}-{k}"
                shutil.copytree(base, run_dir)
                print(f"PPO, {mode} mode, run {k + 1}", file=sys.stderr, flush=True)
                wall = launch(run_dir, "run.stage=ppo", f"run.steps={args.steps}", *common, *extra)
                runs[mode].append({**summarise(ppo_rows(run_dir)), "wall": wall})
    # the run with the median samples/s of each mode stands for it; pairs give the ratios
    results = {
        mode: sorted(rs, key=lambda r: r["samples/s"])[(len(rs) - 1) // 2]
        for mode, rs in runs.items()
    }
    walls = {mode: r["wall"] for mode, r in results.items()}
    pair_ratios = [a["samples/s"] / s["samples/s"] for s, a in zip(runs["sync"], runs["async"])]

    print("`" + " ".join(["python benchmarks/async_vs_sync.py", *sys.argv[1:]]) + "`\n")
    head = ["mode", "samples/s", "vs sync", "step s", "generate s", "train s", "max staleness"]
    head += ["PPO wall s (with evals)", "final gold"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    base_rate = results["sync"]["samples/s"]
    for mode, r in results.items():
        _, _, gold, se = r["evals"][-1]
        cells = [mode, f"{r['samples/s']:.1f}", f"{r['samples/s'] / base_rate:.2f}x"]
        gen = "-" if math.isnan(r["generate"]) else f"{r['generate']:.2f}"  # async: overlapped
        cells += [f"{r['step']:.2f}", gen, f"{r['train']:.2f}"]
        cells += [f"{r['staleness']:.0f}", f"{walls[mode]:.0f}", f"{gold:.3f} ± {se:.3f}"]
        print("| " + " | ".join(cells) + " |")
    print("\nGold score against seconds since PPO started (evaluation time included):\n")
    print("| mode | step | seconds | gold |")
    print("|---|---|---|---|")
    for mode, r in results.items():
        for elapsed, step, gold, se in r["evals"]:
            print(f"| {mode} | {step} | {elapsed:.0f} | {gold:.3f} ± {se:.3f} |")
    print(
        "\nsamples/s ratio of each (sync, async) pair of runs: "
        + ", ".join(f"{x:.2f}x" for x in pair_ratios)
    )
    ratio = statistics.median(pair_ratios)
    (_, _, g_sync, se_sync), (_, _, g_async, se_async) = (
        results["sync"]["evals"][-1],
        results["async"]["evals"][-1],
    )
    within = abs(g_async - g_sync) <= 2 * math.hypot(se_sync, se_async)
    verdict = "PASS" if ratio >= TARGET and within else "MISS"
    print(
        f"\nTarget: async >= {TARGET:g}x sync's samples/s: median pair {ratio:.2f}x; final gold within "
        f"2 combined standard errors: {'yes' if within else 'no'} "
        f"({g_async:.3f} vs {g_sync:.3f}). {verdict}."
    )


if __name__ == "__main__":
    main()
