"""Rollout scaling: generation tokens/s with 1 and 2 generators, and step time per pool layout.

    python benchmarks/rollout_scaling.py --size 10m --prompts 128 --repeats 3 --steps 3

Everything runs on one local Ray cluster (``--cpus`` logical CPUs), with a GPT-2 policy of
``--size`` on the tiny task's vocabulary, one thread per generator (``rollout.num_cpus=1``: the
pool sets ``OMP_NUM_THREADS`` from it). An Orchestrator is started and shut down per layout.

1. Generation scaling: an Orchestrator with 1 generator and one with 2, both up, taking turns
   (so drift in the machine's load hits both alike): ``Orchestrator.generate`` on the same
   ``--prompts`` prompts, in ``--chunks`` chunks dealt by load (each chunk has its own seed, so both
   layouts sample the very same tokens), once to warm up and then ``--repeats`` timed rounds;
   the ratio is the median of the per-round ratios; tokens/s = the batch's generated
   (non-padding) tokens / wall time of the call, median over the rounds.
   Only generation runs; the other pools are idle.
   Side by side, the ceiling: the same generate calls (the roles' ``Generator``, one thread)
   in two plain processes without Ray, all chunks in one, or half in each.
2. Step time with the pools at different sizes: for each (generators, reward scorers,
   reference scorers) layout of ``--layouts`` with one learner rank, one warm-up
   ``Orchestrator.step`` and then ``--steps`` steps of ``--step-prompts`` prompts (in
   ``--chunks`` / 2 chunks, the same for every layout); median
   step time and its blocks (generate, score, train, weight sync).

Target: 2 generators >= 1.8x one generator's tokens/s (needs two free cores: each generator
is one thread). Rows are markdown, ready for the README.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from rlhf_dist import metric_keys as K  # noqa: E402

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

# name -> (n_layer, n_embd, n_head) of a GPT-2 on the tiny task's vocabulary
SIZES = {"1m": (4, 128, 4), "10m": (6, 384, 6), "30m": (10, 512, 8)}
TARGET = 1.8  # 2 generators' tokens/s over one generator's
BLOCKS = list(K.STEP_BLOCKS)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def make_config(
    assets: Path, layout: tuple[int, int, int], prompts_per_step: int, chunks: int, extra
):
    from rlhf_dist.config import load_config

    gens, rewards, refs = layout
    return load_config(
        None,
        [
            f"model.policy={assets / 'policy'}",
            f"data.prompts={assets / 'prompts.jsonl'}",
            f"rollout.num_workers={gens}",
            "rollout.num_cpus=1",
            f"rollout.prompts_per_step={prompts_per_step}",
            # a fixed chunk size: every layout samples the same chunks with the same seeds
            f"rollout.chunk_prompts={max(1, prompts_per_step // chunks)}",
            "rollout.max_new_tokens=32",
            f"reward.num_workers={rewards}",
            f"reference.num_workers={refs}",
            "learner.num_workers=1",
            "ppo.minibatch_size=16",
            "ppo.micro_batch_size=8",
            "checkpoint.every=0",
            "wandb.enabled=false",
            "wandb.table_every=0",
            *extra,
        ],
    )


def _plain_worker(conn, policy: str, tokenizer: str, max_new_tokens: int) -> None:
    """A process without Ray: the roles' Generator with one thread, sampling the chunks sent."""
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)
    from rlhf_dist.roles import Generator

    gen = Generator(policy, tokenizer, max_new_tokens=max_new_tokens)
    while (chunks := conn.recv()) is not None:
        t0, tokens = time.perf_counter(), 0
        for texts, ids, seed in chunks:
            tokens += gen.generate(texts, ids, 1, seed).generated_tokens
        conn.send((tokens, time.perf_counter() - t0))


class PlainProcesses:
    """Two plain processes: the same generate calls without Ray, the ceiling for the ratio."""

    def __init__(self, inputs, max_new_tokens: int):
        import multiprocessing as mp

        ctx = mp.get_context("spawn")
        self.conns, self.procs = [], []
        for _ in range(2):
            here, there = ctx.Pipe()
            args = (there, inputs.policy, inputs.tokenizer, max_new_tokens)
            self.procs.append(ctx.Process(target=_plain_worker, args=args, daemon=True))
            self.procs[-1].start()
            self.conns.append(here)

    def run(self, parts: list[list]) -> tuple[int, float]:
        """Each part to its own process at once; (tokens, wall seconds)."""
        t0 = time.perf_counter()
        for conn, part in zip(self.conns, parts):
            conn.send(part)
        tokens = sum(conn.recv()[0] for conn in self.conns[: len(parts)])
        return tokens, time.perf_counter() - t0

    def close(self) -> None:
        for conn, proc in zip(self.conns, self.procs):
            conn.send(None)
            proc.join(timeout=30)


def generation(cfgs: dict, work: Path, prompts: int, repeats: int) -> dict:
    """Both layouts' orchestrators, and the two plain processes, stay up and take turns, so
    drift in the machine's load hits all alike; returns per layout the medians and the
    per-round tokens/s (layouts 1 and 2, and "plain 1" / "plain 2")."""
    from rlhf_dist.dispatch import chunk_plan
    from rlhf_dist.orchestrator import Orchestrator
    from rlhf_dist.preflight import resolve_inputs

    orchs, plain = {}, None
    try:
        for g, cfg in cfgs.items():
            orchs[g] = Orchestrator(cfg, resolve_inputs(cfg), work / f"gen-{g}")
        ids = list(range(prompts))
        inp, cfg = orchs[1].inputs, cfgs[1]
        # the chunks a step-0 rollout deals, with their seeds: the plain processes sample
        # exactly the same tokens
        plan = chunk_plan(ids, cfg.rollout.chunk_prompts, cfg.run.seed, "rollout", 0)
        chunks = [([inp.prompts[i] for i in c.prompt_ids], c.prompt_ids, c.seed) for c in plan]
        plain = PlainProcesses(inp, cfg.rollout.max_new_tokens)
        layouts = {
            **{
                g: (lambda o=o: o.generators.generate(plan, inp.prompts, 1))
                for g, o in orchs.items()
            },
            "plain 1": lambda: plain.run([chunks]),
            "plain 2": lambda: plain.run([chunks[0::2], chunks[1::2]]),
        }
        rows: dict = {g: [] for g in layouts}
        for call in layouts.values():
            call()  # warm-up
        for _ in range(repeats):
            for g, call in layouts.items():
                t0 = time.perf_counter()
                out = call()
                wall = time.perf_counter() - t0
                if isinstance(out, tuple):  # plain processes: (tokens, seconds)
                    rows[g].append((out[0], wall, out[1]))
                else:
                    rows[g].append((out.generated_tokens, wall, out.compute_s))
    finally:
        if plain is not None:
            plain.close()
        for orch in orchs.values():
            orch.shutdown()
    return {
        g: {
            "tokens": statistics.median(r[0] for r in rs),
            "wall": statistics.median(r[1] for r in rs),
            "compute": statistics.median(r[2] for r in rs),
            "tokens/s": statistics.median(r[0] / r[1] for r in rs),
            "rounds": [r[0] / r[1] for r in rs],
        }
        for g, rs in rows.items()
    }


def steps(cfg, run_dir: Path, n: int) -> dict:
    from rlhf_dist.orchestrator import Orchestrator
    from rlhf_dist.preflight import resolve_inputs

    orch = Orchestrator(cfg, resolve_inputs(cfg), run_dir)
    try:
        orch.step()  # warm-up
        rows = [orch.step() for _ in range(n)]
    finally:
        orch.shutdown()
    rows = [r for r in rows if K.SKIP_REASON not in r] or rows
    out = {b: statistics.median(r.get(K.time_key(b), 0.0) for r in rows) for b in BLOCKS}
    out["step"] = statistics.median(r[K.STEP_TIME] for r in rows)
    out["tokens/s"] = statistics.median(r.get(K.TOKENS_PER_S, 0.0) for r in rows)
    out["n"] = len(rows)
    return out


def parse_layouts(text: str) -> list[tuple[int, int, int]]:
    layouts = []
    for item in text.split(","):
        parts = tuple(int(x) for x in item.split(":"))
        if len(parts) != 3 or min(parts) < 1:
            raise SystemExit(f"--layouts: {item!r} is not generators:rewards:references")
        layouts.append(parts)
    return layouts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--size", default="10m", choices=list(SIZES), help="policy size")
    ap.add_argument("--prompts", type=int, default=128, help="prompts per generate call (part 1)")
    ap.add_argument(
        "--chunks", type=int, default=8, help="chunks per generate call (part 2: half as many)"
    )
    ap.add_argument("--repeats", type=int, default=5, help="timed rounds of generate calls")
    ap.add_argument("--steps", type=int, default=3, help="timed PPO steps per layout (part 2)")
    ap.add_argument("--step-prompts", type=int, default=32, help="rollout.prompts_per_step")
    ap.add_argument(
        "--layouts",
        default="1:1:1,2:1:1,2:2:2",
        help="part 2 layouts, generators:reward scorers:reference scorers, comma separated",
    )
    ap.add_argument("--cpus", type=int, default=8, help="logical CPUs of the local Ray cluster")
    ap.add_argument("--skip-steps", action="store_true", help="run part 1 only")
    ap.add_argument("overrides", nargs="*", help="config overrides, e.g. rollout.max_new_tokens=64")
    args = ap.parse_args()
    if args.prompts < 2 or args.prompts % 2:
        raise SystemExit("--prompts: an even number >= 2 (it is split between 2 generators)")
    layouts = [] if args.skip_steps else parse_layouts(args.layouts)

    import ray

    from rlhf_dist.launch import init_ray
    from rlhf_dist.tasks.tiny import build_assets

    t_start, load_start = time.perf_counter(), os.getloadavg()[0]
    gen_rows: dict[int, dict] = {}
    step_rows: dict[tuple[int, int, int], dict] = {}
    with tempfile.TemporaryDirectory() as d:
        work = Path(d)
        n_layer, n_embd, n_head = SIZES[args.size]
        assets = build_assets(work / args.size, n_layer=n_layer, n_embd=n_embd, n_head=n_head)
        cluster = make_config(assets, (1, 1, 1), 16, 1, [f"ray.num_cpus={args.cpus}"])
        started = init_ray(cluster, "")
        try:
            cfgs = {
                g: make_config(assets, (g, 1, 1), args.prompts, args.chunks, args.overrides)
                for g in (1, 2)
            }
            log(f"generation: 1 and 2 generators in turns, {args.prompts} prompts")
            gen_rows = generation(cfgs, work, args.prompts, args.repeats)
            for layout in layouts:
                cfg = make_config(
                    assets,
                    layout,
                    args.step_prompts,
                    max(1, args.chunks // 2),
                    [f"run.steps={args.steps + 1}", *args.overrides],
                )
                log(f"steps: layout {layout}")
                name = "-".join(map(str, layout))
                step_rows[layout] = steps(cfg, work / f"step-{name}", args.steps)
        finally:
            if started:
                ray.shutdown()
    wall = time.perf_counter() - t_start

    print("`" + " ".join(["python benchmarks/rollout_scaling.py", *sys.argv[1:]]) + "`")
    print(
        f"\nPolicy {args.size}, {os.cpu_count()} cores, Ray cluster of {args.cpus} CPUs, one "
        f"thread per generator; load average {load_start:.1f} at the start; whole run "
        f"{wall / 60:.1f} min.\n"
    )
    print(
        f"Generation: {args.prompts} prompts per call, median of {args.repeats} calls after a "
        "warm-up.\n"
    )
    head = ["generators", "tokens", "wall s", "slowest generator s", "tokens/s", "vs 1"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for g, r in gen_rows.items():
        base = gen_rows["plain 1" if str(g).startswith("plain") else 1]["tokens/s"]
        name = f"{g} (no Ray)" if str(g).startswith("plain") else str(g)
        cells = [name, f"{r['tokens']:.0f}", f"{r['wall']:.3f}", f"{r['compute']:.3f}"]
        cells += [f"{r['tokens/s']:.0f}", f"{r['tokens/s'] / base:.2f}x"]
        print("| " + " | ".join(cells) + " |")
    if step_rows:
        print(
            f"\nStep time: {args.step_prompts} prompts per step, learner world size 1, median "
            f"of {args.steps} steps after a warm-up (seconds); tokens/s = generated tokens / step "
            "time.\n"
        )
        head = ["generators", "reward", "reference", "step s"]
        head += [f"{b} s" for b in BLOCKS] + ["tokens/s"]
        print("| " + " | ".join(head) + " |")
        print("|" + "---|" * len(head))
        for (g, rw, rf), r in step_rows.items():
            cells = [str(g), str(rw), str(rf), f"{r['step']:.3f}"]
            cells += [f"{r[b]:.3f}" for b in BLOCKS] + [f"{r['tokens/s']:.0f}"]
            print("| " + " | ".join(cells) + " |")
    rounds = [b / a for a, b in zip(gen_rows[1]["rounds"], gen_rows[2]["rounds"])]
    ceiling = [b / a for a, b in zip(gen_rows["plain 1"]["rounds"], gen_rows["plain 2"]["rounds"])]
    ratio = statistics.median(rounds)
    print(
        "\nPer-round ratios, 2 / 1 in the same round: generators "
        f"{', '.join(f'{x:.2f}' for x in rounds)}; plain processes without Ray (the same "
        f"generate calls, split 50/50) {', '.join(f'{x:.2f}' for x in ceiling)}"
    )
    verdict = "PASS" if ratio >= TARGET else "MISS"
    print(
        f"\nTarget: 2 generators >= {TARGET:g}x one generator's tokens/s: median per-round ratio "
        f"{ratio:.2f}x, {verdict}."
    )


if __name__ == "__main__":
    main()
