"""The system's PPO step against the same work done in one plain process, block by block.

    python benchmarks/vs_pure.py --sizes tiny,10m,30m --steps 6

TRL's PPO shape (issue #17): a GPT-2 policy, a reward model and a value model (the policy's
backbone with a fresh head), 16 prompts of up to 8 tokens, 16 new tokens, 1 epoch, 2
minibatches of 8. For each size the same step is done

- by the system: a local Ray cluster, ``mode=sync``, the configured pools (by default 2
  generators, 1 reward and 1 reference scorer, 1 DeepSpeed learner rank), timed by the sync
  loop's own block timer;
- in one plain process (this one, with Ray idle): HF ``generate`` on the same 16 prompts as
  the system's step (its prompt order, replayed), the reward and reference forwards, the old
  log-probs and values, GAE, then two minibatches of policy and value forward/backward with
  ``torch.optim.AdamW`` (fused, as the learner's, where torch has the kernel) and gradient
  clipping; the weight sync is a parameter copy into the sampling copy of the policy. No
  Ray, no DeepSpeed, ``torch.set_num_threads`` = every core.

The two take turns, step by step (the first step of each is a warm-up and is dropped), and
the table shows each block's median seconds for both and their ratio; the last line gives the
step ratio for each size. Config overrides after the options apply to the system's side
(e.g. ``rollout.num_workers=1``).
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

# name -> (n_layer, n_embd, n_head) of a GPT-2 on the tiny task's vocabulary
SIZES = {"tiny": (2, 128, 2), "10m": (6, 384, 6), "30m": (10, 512, 8)}
BLOCKS = [*K.STEP_BLOCKS, "step"]
PROMPTS, NEW_TOKENS, MINIBATCH = 16, 16, 8
TARGETS = {"tiny": 1.5, "10m": 1.15, "30m": 1.15}  # step ratio; 30m: every block <= 1.3


def build(workdir: Path, name: str) -> Path:
    """Policy, tokenizer, prompts and a reward model (the policy with a fresh scalar head)."""
    from rlhf_dist.models import load_reward_model, load_tokenizer
    from rlhf_dist.tasks.tiny import build_assets

    n_layer, n_embd, n_head = SIZES[name]
    assets = build_assets(workdir / name, n_layer=n_layer, n_embd=n_embd, n_head=n_head)
    rm = assets / "reward"
    if not rm.exists():
        import torch

        torch.manual_seed(1)
        load_reward_model(str(assets / "policy"), new_head=True).save_pretrained(rm)
        load_tokenizer(str(assets / "policy")).save_pretrained(rm)
    return assets


class System:
    """The system on a local Ray cluster, one recorded synchronous step per call."""

    def __init__(self, assets: Path, run_dir: Path, steps: int, overrides: list[str]):
        import ray

        from rlhf_dist.config import load_config
        from rlhf_dist.launch import init_ray
        from rlhf_dist.orchestrator import Orchestrator
        from rlhf_dist.preflight import resolve_inputs

        self.cfg = load_config(
            None,
            [
                f"model.policy={assets / 'policy'}",
                f"reward.model={assets / 'reward'}",
                f"data.prompts={assets / 'prompts.jsonl'}",
                f"run.steps={steps}",
                f"run.dir={run_dir}",
                "mode=sync",
                "learner.num_workers=1",
                f"rollout.prompts_per_step={PROMPTS}",
                f"rollout.max_new_tokens={NEW_TOKENS}",
                "rollout.max_prompt_tokens=8",
                "ppo.epochs=1",
                f"ppo.minibatch_size={MINIBATCH}",
                f"ppo.micro_batch_size={MINIBATCH}",
                "checkpoint.every=0",
                "wandb.enabled=false",
                *overrides,
            ],
        )
        self.started = init_ray(self.cfg, "")
        self.orch = Orchestrator(self.cfg, resolve_inputs(self.cfg), run_dir)
        self.params = ray.get(self.orch.learners.actors[0].setup_info.remote())["policy_params"]
        self.prompts = self.orch.inputs.prompts

    def step(self) -> dict:
        row = self.orch.step()
        return {b: row[K.time_key(b)] for b in K.STEP_BLOCKS} | {"step": row[K.STEP_TIME]}

    def close(self) -> None:
        import ray

        self.orch.shutdown()
        if self.started:
            ray.shutdown()


class Plain:
    """The same step in this process: plain torch and transformers, every core."""

    def __init__(self, assets: Path, prompts: list[str], cursor, seed: int = 0):
        import torch

        from rlhf_dist.models import load_critic, load_policy, load_reward_model, load_tokenizer
        from rlhf_dist.roles.deepspeed_rank import fused_adam_ok

        torch.set_num_threads(os.cpu_count() or 1)
        torch.manual_seed(seed)
        policy = str(assets / "policy")
        self.tok = load_tokenizer(policy, padding_side="left")
        self.rm_tok = load_tokenizer(str(assets / "reward"), padding_side="right")
        self.sampler = load_policy(policy).eval()
        self.policy = load_policy(policy).eval()  # dropout off, as the learner has it
        self.ref = load_policy(policy).eval().requires_grad_(False)
        self.critic = load_critic(policy).eval()
        self.reward = load_reward_model(str(assets / "reward")).eval().requires_grad_(False)
        # the fused kernel where torch has it, as the learner uses: the plain side's best
        fused = {"fused": True} if fused_adam_ok(torch.device("cpu")) else {}
        self.opt_p = torch.optim.AdamW(self.policy.parameters(), lr=1e-5, weight_decay=0.0, **fused)
        self.opt_v = torch.optim.AdamW(self.critic.parameters(), lr=5e-5, weight_decay=0.0, **fused)
        # the system's prompt order (its cursor, replayed): both sides see the same prompts,
        # so the same prompt widths, step by step
        self.prompts, self.cursor, self.seed = prompts, cursor, seed

    def step(self) -> dict:
        import torch

        from rlhf_dist import algo
        from rlhf_dist.models import response_logprobs, response_values, reward_text

        times = {}
        t_step = t0 = time.perf_counter()
        prompts = [self.prompts[i] for i in self.cursor.take(PROMPTS)]
        tok = self.tok
        with torch.no_grad():
            enc = tok(prompts, return_tensors="pt", padding=True)
            out = self.sampler.generate(
                **enc,
                do_sample=True,
                max_new_tokens=NEW_TOKENS,
                pad_token_id=tok.pad_token_id,
                eos_token_id=tok.eos_token_id,
                return_dict_in_generate=True,
                output_logits=True,
            )
            P = enc.input_ids.shape[1]
            response = out.sequences[:, P:]
            algo.logprobs_from_logits(torch.stack(out.logits, 1).float(), response)
            is_eos = response == tok.eos_token_id
            after = (is_eos.long().cumsum(-1) - is_eos.long()) > 0
            mask = (~after).float()
            response = response.masked_fill(after, tok.pad_token_id)
            seq = torch.cat([enc.input_ids, response], 1)
            am = torch.cat([enc.attention_mask, mask.long()], 1)
            texts = tok.batch_decode(response, skip_special_tokens=True)
        times["generate"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        with torch.no_grad():
            renc = self.rm_tok(
                [reward_text(p, r) for p, r in zip(prompts, texts)],
                return_tensors="pt",
                padding=True,
            )
            scores = self.reward(**renc).logits[:, 0].float()
            ref_logp = response_logprobs(self.ref, seq, am, P)[0] * mask
        times["score"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        with torch.no_grad():
            old_logp = response_logprobs(self.policy, seq, am, P)[0]
            old_values = response_values(self.critic, seq, am, P) * mask
            rewards, _ = algo.kl_penalized_rewards(scores, old_logp, ref_logp, mask, 0.05, "k1")
            adv, returns = algo.gae_advantages(rewards, old_values, mask, 1.0, 0.95)
            adv = algo.masked_whiten(adv, mask)
        perm = torch.randperm(PROMPTS)
        for start in range(0, PROMPTS, MINIBATCH):
            i = perm[start : start + MINIBATCH]
            s, a, m = seq[i], am[i], mask[i]
            logp, ent = response_logprobs(self.policy, s, a, P, with_entropy=True)
            loss, _ = algo.ppo_policy_loss(logp, old_logp[i], adv[i], m, 0.2)
            algo.masked_mean(ent, m)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.policy.parameters(), 1.0)
            self.opt_p.step()
            self.opt_p.zero_grad(set_to_none=True)
            values = response_values(self.critic, s, a, P)
            v_loss, _ = algo.value_loss(values, old_values[i], returns[i], m, 0.2)
            v_loss.backward()
            torch.nn.utils.clip_grad_norm_(self.critic.parameters(), 1.0)
            self.opt_v.step()
            self.opt_v.zero_grad(set_to_none=True)
        times["train"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        with torch.no_grad():
            torch._foreach_copy_(list(self.sampler.parameters()), list(self.policy.parameters()))
        times["weight_sync"] = time.perf_counter() - t0
        times["step"] = time.perf_counter() - t_step
        return times


def run_size(name: str, steps: int, overrides: list[str], workdir: Path) -> dict:
    assets = build(workdir, name)
    system = System(assets, workdir / f"run-{name}", steps, overrides)
    try:
        from rlhf_dist.data import PromptCursor

        cfg = system.cfg
        cursor = PromptCursor(len(system.prompts), cfg.run.seed, cfg.data.shuffle)
        plain = Plain(assets, system.prompts, cursor)
        sys_rows, plain_rows = [], []
        for i in range(steps):  # turns: system first on even steps, plain first on odd ones
            order = [(system, sys_rows), (plain, plain_rows)]
            for side, rows in order if i % 2 == 0 else order[::-1]:
                rows.append(side.step())
        params = system.params
    finally:
        system.close()
    out = {"params": params, "steps": steps - 1}
    for b in BLOCKS:
        out[b] = (
            statistics.median(r[b] for r in sys_rows[1:]),
            statistics.median(r[b] for r in plain_rows[1:]),
        )
    return out


def table(results: dict) -> str:
    head = ["size", "params", "block", "system s", "plain s", "system / plain"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in results.items():
        for b in BLOCKS:
            s, p = r[b]
            cells = [name, f"{r['params'] / 1e6:.2f}M", b, f"{s:.4f}", f"{p:.4f}"]
            cells.append(f"{s / p:.2f}x" if p > 0 else "-")
            lines.append("| " + " | ".join(cells) + " |")
    ratios = []
    for name, r in results.items():
        s, p = r["step"]
        ratios.append(f"{name} {s / p:.2f}x (target <= {TARGETS[name]}x)")
    lines.append("")
    lines.append("step ratio (system / plain): " + ", ".join(ratios))
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--sizes", default="tiny,10m,30m", help=f"comma list of {list(SIZES)}")
    ap.add_argument("--steps", type=int, default=6, help="steps per side (the first is dropped)")
    ap.add_argument("overrides", nargs="*", help="config overrides for the system's side")
    args = ap.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as d:
        for name in args.sizes.split(","):
            results[name] = run_size(name, args.steps, args.overrides, Path(d))
            print(f"done {name}", file=sys.stderr)
    print(table(results))


if __name__ == "__main__":
    main()
