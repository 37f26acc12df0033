"""Full fine-tuning vs LoRA (r=8) side by side: bytes and seconds per weight sync, learner peak
memory and PPO step time, on a 30M and a 100M GPT-2 policy.

    python benchmarks/lora.py                      # 30m and 100m, full and LoRA r=8
    python benchmarks/lora.py --sizes 30m --steps 2

Each (size, mode) runs in a fresh process so that its peak memory is its own. That process
builds the project's roles in-process (no Ray): a ``Learner`` (one rank, DeepSpeed ZeRO-2,
fp32, ``ppo.estimator=grpo`` so the policy alone is measured) wrapped with LoRA by the same
code as a real run (``model.lora_rank=8``, every linear layer), runs ``--steps`` PPO updates on
a fixed batch of 16 samples (16 prompt + 16 response tokens), then forms a gloo weight-sync
group with one ``Generator`` and times ``--syncs`` syncs (``send_weights`` /
``receive_weights``, verify on, as ``sync.verify`` does). Reported:

- sync bytes: what one sync moves (``sync/bytes``: the synced parameters' bytes);
- sync s: median seconds per sync, end to end (send, receive, both checksums);
- learner peak RSS: the process's peak resident memory after the learner's updates (before the
  generator is built), Python and torch included;
- step s: median PPO update time (the first update warms up and is not counted).

Target: sync bytes <= 5% of full fine-tuning's at r=8 on the 100M model.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

# name -> (n_layer, n_embd, n_head) of a GPT-2 on the tiny task's vocabulary
SIZES = {"1m": (5, 128, 4), "30m": (8, 576, 8), "100m": (12, 832, 8)}  # 1m: a quick check
MODES = {"full": 0, "lora r=8": 8}
TARGET = 0.05  # LoRA sync bytes / full sync bytes on the 100M model
BATCH, PROMPT, RESPONSE = 16, 16, 16


def _batch(vocab: int):
    import torch

    from rlhf_dist.batch import RolloutBatch

    g = torch.Generator().manual_seed(0)
    seq = torch.randint(4, vocab, (BATCH, PROMPT + RESPONSE), generator=g)
    return RolloutBatch(
        sequences=seq,
        attention_mask=torch.ones_like(seq),
        response_mask=torch.ones(BATCH, RESPONSE),
        behaviour_logprobs=torch.full((BATCH, RESPONSE), -3.0),
        prompt_len=PROMPT,
        prompts=[""] * BATCH,
        responses=[""] * BATCH,
        prompt_ids=list(range(BATCH // 2)) * 2,
        versions=torch.zeros(BATCH, dtype=torch.long),
        truncated=torch.zeros(BATCH, dtype=torch.bool),
        scores=torch.rand(BATCH, generator=g),
        ref_logprobs=torch.full((BATCH, RESPONSE), -3.0),
    )


def one(size: str, rank: int, steps: int, syncs: int) -> dict:
    """Measure one (size, LoRA rank) in this process."""
    from rlhf_dist import weight_sync
    from rlhf_dist.config import load_config
    from rlhf_dist.lora import lora_settings
    from rlhf_dist.roles import Generator, Learner
    from rlhf_dist.roles.common import in_threads
    from rlhf_dist.tasks.tiny import build_policy, build_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp) / "policy")
        n_layer, n_embd, n_head = SIZES[size]
        tok = build_tokenizer(path)
        params = build_policy(path, tok, n_layer=n_layer, n_embd=n_embd, n_head=n_head)
        cfg = load_config(
            None,
            [
                "learner.num_workers=1",
                "learner.zero_stage=2",
                "learner.lr=1e-4",
                "rollout.num_workers=1",
                f"rollout.prompts_per_step={BATCH // 2}",
                "rollout.samples_per_prompt=2",
                f"rollout.max_new_tokens={RESPONSE}",
                "ppo.estimator=grpo",
                f"ppo.minibatch_size={BATCH}",
                "ppo.micro_batch_size=4",
                *([f"model.lora_rank={rank}"] if rank else []),
            ],
        )
        learner = Learner(cfg, rank=0, world_size=1)
        learner.setup(path, "", "127.0.0.1", learner.host_rendezvous())
        batch = _batch(len(tok))
        step_s = []
        for _ in range(steps + 1):
            t0 = time.perf_counter()
            learner.ppo_update(batch, kl_coef=0.0, seed=0)
            step_s.append(time.perf_counter() - t0)
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

        gen = Generator(path, max_new_tokens=RESPONSE, lora=lora_settings(cfg, "policy"))
        manifest, bucket = weight_sync.manifest_of(learner.policy.module), 64 << 20
        info = learner.open_weight_sync("gloo", bucket)  # hosts the group's store
        channel = weight_sync.Channel("gloo", bucket, manifest, info)

        def member(rank: int):
            return weight_sync.Membership("127.0.0.1", info["port"], rank, 2, "bench", 600)

        in_threads(
            lambda: learner.open_weight_sync("gloo", bucket, member(0)),
            lambda: gen.open_weight_sync(channel, member(1)),
        )
        sync_s = []
        for v in range(1, syncs + 1):
            t0 = time.perf_counter()
            (sent, _), got = in_threads(
                lambda v=v: learner.send_weights(bucket, v, verify=True),
                lambda v=v: gen.receive_weights(v, verify=True),
            )
            sync_s.append(time.perf_counter() - t0)
            assert sent.checksum == got.checksum, "sync checksum mismatch"
        return {
            "size": size,
            "params": params,
            "rank": rank,
            "sync_bytes": weight_sync.manifest_bytes(manifest),
            "sync_s": statistics.median(sync_s),
            "peak_mb": peak_mb,
            "step_s": statistics.median(step_s[1:]),
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="30m,100m")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--syncs", type=int, default=5)
    parser.add_argument("--one", nargs=2, metavar=("SIZE", "RANK"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        out = one(args.one[0], int(args.one[1]), args.steps, args.syncs)
        print("RESULT " + json.dumps(out), flush=True)
        return
    results = []
    for size in args.sizes.split(","):
        for mode, rank in MODES.items():
            print(f"[{time.strftime('%H:%M:%S')}] {size} {mode}", file=sys.stderr, flush=True)
            cmd = [sys.executable, __file__, "--one", size, str(rank)]
            cmd += ["--steps", str(args.steps), "--syncs", str(args.syncs)]
            p = subprocess.run(cmd, capture_output=True, text=True, check=False)
            lines = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
            if p.returncode or not lines:
                sys.exit(f"{size} {mode} failed:\n{p.stderr[-3000:]}")
            results.append({"mode": mode, **json.loads(lines[-1][len("RESULT ") :])})
    print(
        "| policy | mode | sync bytes | vs full | sync s | learner peak RSS | step s |\n"
        "|---|---|---|---|---|---|---|"
    )
    full = {r["size"]: r for r in results if r["rank"] == 0}
    for r in results:
        share = r["sync_bytes"] / full[r["size"]]["sync_bytes"] if r["size"] in full else 1.0
        print(
            f"| {r['size']} ({r['params'] / 1e6:.1f}M) | {r['mode']} | "
            f"{r['sync_bytes'] / 2**20:.2f} MiB | {share:.2%} | {r['sync_s']:.3f} | "
            f"{r['peak_mb'] / 1024:.2f} GiB | {r['step_s']:.2f} |"
        )
    if "100m" in full:
        lora = [r for r in results if r["size"] == "100m" and r["rank"] == 8]
        if lora:
            share = lora[0]["sync_bytes"] / full["100m"]["sync_bytes"]
            verdict = "met" if share <= TARGET else "MISSED"
            print(
                f"\ntarget: LoRA r=8 sync bytes <= {TARGET:.0%} of full on 100M: {share:.2%} ({verdict})"
            )


if __name__ == "__main__":
    main()
