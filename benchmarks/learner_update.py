"""The learner's update on one fixed batch, in process (no Ray), lever by lever.

    python benchmarks/learner_update.py --size 30m --repeats 6

On TRL's PPO shape of ``vs_pure.py`` (16 samples, 16 new tokens, 1 epoch, 2 minibatches of
8, a value model), with 2 torch threads:

- **optimizer step**: one AdamW step over the policy's parameters (gradients set) with torch's
  single-tensor, foreach and fused implementations, and one global gradient norm as the
  learner took it a second time beside DeepSpeed's fp32 ZeRO-0 clipping (before 5b8c0fc);
- **one PPO update** (``Learner.ppo_update`` on one batch sampled by the roles' own
  ``Generator``): the engines with torch's fused AdamW (the default where torch has the
  kernel) against the unfused one, and, with the fused one, the policy parameters living in a
  ``/dev/shm`` slot (``sync.zero_copy``, ``weight_sync.ShmLive``) against private memory.

The variants take turns, round by round (the first round is a warm-up and is dropped), and
each table gives the medians and their ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import vs_pure  # noqa: E402

THREADS = 2


def optimizer_steps(policy: str, repeats: int) -> dict[str, list[float]]:
    import torch

    from rlhf_dist.models import load_policy

    kinds = {"single-tensor": {"foreach": False}, "foreach": {"foreach": True}}
    kinds["fused"] = {"fused": True}
    opts, times = {}, {k: [] for k in [*kinds, "grad norm (taken again)"]}
    for kind, kw in kinds.items():
        ps = list(load_policy(policy).parameters())
        for p in ps:
            p.grad = torch.randn_like(p) * 1e-2
        opts[kind] = (ps, torch.optim.AdamW(ps, lr=1e-5, weight_decay=0.0, **kw))
    for _ in range(repeats + 1):
        for kind, (_, opt) in opts.items():
            t0 = time.perf_counter()
            opt.step()
            times[kind].append(time.perf_counter() - t0)
        ps = opts["fused"][0]
        t0 = time.perf_counter()
        float(torch.stack([p.grad.float().norm() for p in ps]).norm())  # as _step took it
        times["grad norm (taken again)"].append(time.perf_counter() - t0)
    return {k: v[1:] for k, v in times.items()}


def learner(cfg, policy: str, fused: bool):
    from rlhf_dist.roles import Learner, deepspeed_rank

    real = deepspeed_rank.fused_adam_ok
    deepspeed_rank.fused_adam_ok = real if fused else (lambda device: False)
    try:
        out = Learner(cfg, rank=0, world_size=1)
        out.setup(policy, policy, "127.0.0.1", out.host_rendezvous())
    finally:
        deepspeed_rank.fused_adam_ok = real
    assert bool(out.policy.optimizer.defaults.get("fused")) == fused
    return out


def updates(assets: vs_pure.Assets, repeats: int) -> dict[str, list[float]]:
    import torch

    from rlhf_dist import weight_sync
    from rlhf_dist.config import load_config
    from rlhf_dist.roles import Generator

    policy = str(assets.policy)
    n, new = vs_pure.PROMPTS, vs_pure.NEW_TOKENS
    cfg = load_config(
        None,
        [
            "learner.num_workers=1",
            "rollout.num_workers=1",
            f"rollout.prompts_per_step={n}",
            "rollout.samples_per_prompt=1",
            f"rollout.max_new_tokens={new}",
            f"rollout.max_prompt_tokens={assets.max_prompt_tokens}",
            "ppo.epochs=1",
            f"ppo.minibatch_size={vs_pure.MINIBATCH}",
            f"ppo.micro_batch_size={vs_pure.MINIBATCH}",
        ],
    )
    lines = assets.prompts.read_text().splitlines()[:n]
    prompts = [json.loads(line)["prompt"] for line in lines]
    batch = Generator(policy, max_new_tokens=new).generate(prompts, list(range(n)), seed=0)
    batch.scores = torch.randn(n, generator=torch.Generator().manual_seed(0))
    batch.ref_logprobs = batch.behaviour_logprobs.clone()

    fused, unfused = learner(cfg, policy, True), learner(cfg, policy, False)
    params = [p for _, p in weight_sync.sync_params(fused.policy.module)]
    live = weight_sync.ShmLive(params, weight_sync.manifest_of(fused.policy.module), 64 << 20)

    def private():
        with torch.no_grad():
            for p in params:
                p.data = p.data.clone()

    runs = {
        "unfused AdamW": (unfused, None),
        "fused AdamW, private memory": (fused, private),
        "fused AdamW, parameters in /dev/shm": (fused, live.home),
    }
    times = {k: [] for k in runs}
    for i in range(repeats + 1):
        order = list(runs) if i % 2 else list(runs)[::-1]
        for name in order:
            ln, place = runs[name]
            if place is not None:
                place()
            t0 = time.perf_counter()
            ln.ppo_update(batch, 0.05, i)
            times[name].append(time.perf_counter() - t0)
    live.close()
    return {k: v[1:] for k, v in times.items()}


def table(title: str, unit: str, times: dict[str, list[float]], base: str) -> str:
    b = statistics.median(times[base])
    rows = [f"| {title} | {unit} | / {base} |", "|---|---|---|"]
    for name, ts in times.items():
        m = statistics.median(ts)
        rows.append(
            f"| {name} | {m * (1000 if unit == 'ms' else 1):.{1 if unit == 'ms' else 3}f}"
            f" | {m / b:.2f}x |"
        )
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--size", default="30m", choices=list(vs_pure.GPT2_SIZES))
    ap.add_argument("--repeats", type=int, default=6, help="timed rounds (one more as warm-up)")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(THREADS)
    with tempfile.TemporaryDirectory() as d:
        assets = vs_pure.build(Path(d), args.size, vs_pure.DEFAULT_ASSETS)
        steps = optimizer_steps(str(assets.policy), args.repeats)
        ups = updates(assets, args.repeats)
    print(f"{args.size} policy, {THREADS} threads, median of {args.repeats}\n")
    print(table("optimizer step", "ms", steps, "fused"))
    print()
    print(table("one PPO update", "s", ups, "fused AdamW, private memory"))


if __name__ == "__main__":
    main()
