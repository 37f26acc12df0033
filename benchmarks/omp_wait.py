"""How OpenMP's wait policy changes a two-thread training step, alone and with a second one.

    python benchmarks/omp_wait.py --steps 60 --rounds 2

A tiny GPT-2 (``--layers``, ``--width``; vocabulary 1000, 8 sequences of 24 tokens) trains
with torch's fused AdamW on 2 threads, in a fresh process per measurement, under each
``OMP_WAIT_POLICY``: ``PASSIVE`` (a waiting thread sleeps at once), libgomp's default (unset:
it spins a while, then sleeps) and ``ACTIVE`` is left out (it spins without end: a second
process on the same cores then crawls). Two layouts:

- **alone**: one process on the machine, as the learner trains in ``mode=sync`` (the blocks
  take turns, so a worker's threads have their cores);
- **two at once**: two such processes side by side on the same cores, as two-thread workers of
  ``mode=async`` would be when generation and training overlap on one machine.

The table gives the median step of each process, per round (the policies take turns within a
round). ``rlhf_dist/ray_env.py`` picks the policy by mode from these numbers.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

POLICIES = {"PASSIVE": "PASSIVE", "default (unset)": None}


def child(layers: int, width: int, steps: int) -> None:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.set_num_threads(2)
    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=layers, n_embd=width, n_head=2, vocab_size=1000, n_positions=64)
    model = GPT2LMHeadModel(cfg)
    opt = torch.optim.AdamW(model.parameters(), fused=True)
    x = torch.randint(0, 1000, (8, 24))

    def step() -> None:
        model(x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()

    for _ in range(3):  # warm-up
        step()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    print(statistics.median(times))


def measure(policy: str | None, processes: int, args) -> list[float]:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    if policy is not None:
        env["OMP_WAIT_POLICY"] = policy
    cmd = [sys.executable, __file__, "--child", str(args.layers), str(args.width), str(args.steps)]
    procs = [
        subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True) for _ in range(processes)
    ]
    out = [p.communicate(timeout=args.timeout)[0] for p in procs]
    for p in procs:
        if p.returncode != 0:
            raise SystemExit(f"a measuring process failed (exit {p.returncode})")
    return [float(o.strip()) for o in out]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--steps", type=int, default=60, help="timed steps per process")
    ap.add_argument("--rounds", type=int, default=2, help="rounds of every policy and layout")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds per measurement")
    ap.add_argument("--child", nargs=3, type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(*args.child)
        return
    if args.steps < 1 or args.rounds < 1:
        ap.error("--steps and --rounds must be >= 1")
    rows: dict[tuple[str, str], list[str]] = {}
    for _ in range(args.rounds):
        for layout, n in (("alone", 1), ("two at once", 2)):
            for name, policy in POLICIES.items():
                ms = " / ".join(f"{t * 1e3:.1f}" for t in measure(policy, n, args))
                rows.setdefault((layout, name), []).append(ms)
                print(f"{layout}, {name}: {ms} ms", file=sys.stderr)
    print(
        f"tiny GPT-2 ({args.layers} layers, width {args.width}), 2 threads, fused AdamW, "
        f"median of {args.steps} steps per process, ms"
    )
    print()
    print(
        "| layout | OMP_WAIT_POLICY | "
        + " | ".join(f"round {i + 1}" for i in range(args.rounds))
        + " |"
    )
    print("|---|---|" + "---|" * args.rounds)
    for (layout, name), cells in rows.items():
        print(f"| {layout} | {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
