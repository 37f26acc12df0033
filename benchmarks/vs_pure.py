"""The system's PPO step against the same work done in one plain process, block by block.

    python benchmarks/vs_pure.py --sizes tiny,10m,30m --steps 6
    python benchmarks/vs_pure.py --sizes 135m --steps 6

TRL's PPO shape (issue #17): a policy, a reward model and a value model (the policy's backbone
with a fresh head), 16 prompts, 16 new tokens, 1 epoch, 2 minibatches of 8. Sizes
(``--sizes``):

- ``tiny``, ``10m``, ``30m``: GPT-2s on the tiny task's word-level vocabulary
  (``rlhf_dist.tasks.tiny``), prompts of up to 8 tokens;
- ``135m``: the real SmolLM2-135M-Instruct (``builtin:smollm2-135m-instruct``, a Llama with a
  49,152-entry BPE tokenizer, converted once by ``rlhf_dist.tasks.smollm2.build_assets`` into
  ``--assets``, the default ``model.assets_dir``) on ``builtin:wordmath``'s chat prompts
  (``rlhf_dist.tasks.wordmath.build_assets`` into ``--assets`` too). The prompts are message
  lists: the system renders them with the model's chat template (``data.chat_template=auto``)
  and tokenises the text without adding special tokens; the plain side takes the very texts
  the system rendered (its ``Inputs``) and the same ``add_special_tokens``, so both feed the
  same token ids. Rendered, the prompts are 44-64 tokens: ``rollout.max_prompt_tokens`` is
  ``wordmath.MAX_PROMPT_TOKENS`` (64) for this size, 8 for the others.

Every size's reward model is its policy with a fresh scalar head
(``load_reward_model(policy, new_head=True)``, seed 1, saved into the work directory); at
135m it reads the conversation (prompt messages and response) rendered with its own chat
template, on both sides as the system's reward scorer does (``rlhf_dist.chat.reward_input``).

For each size the same step is done

- by the system: a local Ray cluster, ``mode=sync``, the configured pools (by default 2
  generators, 1 reward and 1 reference scorer, 1 DeepSpeed learner rank), timed by the sync
  loop's own block timer;
- in one plain process (this one, with Ray idle): HF ``generate`` on the same 16 prompts as
  the system's step (its prompt order, replayed), with the system's sampling settings and stop
  tokens, the reward and reference forwards, the old log-probs and values, GAE, then two
  minibatches of policy and value forward/backward with ``torch.optim.AdamW`` (fused, as the
  learner's, where torch has the kernel) and gradient clipping; the weight sync is a parameter
  copy into the sampling copy of the policy. No Ray, no DeepSpeed, ``torch.set_num_threads`` =
  every core.

The two take turns, step by step (the first step of each is a warm-up and is dropped), and
the table shows each block's median seconds for both and their ratio; the last lines give the
step ratio for each size against its target, and the blocks over their target where a size
has one. Config overrides after the options apply to the system's side
(e.g. ``rollout.num_workers=1``), after the size's own layout (``LAYOUTS``).

Memory at 135m: the system's learner holds policy and critic with AdamW (about 4.3 GB of
parameters, gradients and moments in fp32), the plain side as much again, besides the sampling,
reference and reward copies on each side; the 24 GB machine holds both (``LAYOUTS`` says
which layout the size runs). 135m takes about a minute per step per side on the 2-core
machine.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from rlhf_dist import metric_keys as K  # noqa: E402

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

# name -> (n_layer, n_embd, n_head) of a GPT-2 on the tiny task's vocabulary
GPT2_SIZES = {"tiny": (2, 128, 2), "10m": (6, 384, 6), "30m": (10, 512, 8)}
REAL = "135m"  # SmolLM2-135M-Instruct on builtin:wordmath
SIZES = [*GPT2_SIZES, REAL]
BLOCKS = [*K.STEP_BLOCKS, "step"]
PROMPTS, NEW_TOKENS, MINIBATCH = 16, 16, 8
GPT2_PROMPT_TOKENS = 8  # the tiny task's prompts
TARGETS = {"tiny": 1.5, "10m": 1.15, "30m": 1.15, "135m": 1.15}  # step ratio
BLOCK_TARGETS = {"30m": 1.3, "135m": 1.3}  # every block's ratio
# a size's own config overrides for the system's side, before the command line's
LAYOUTS: dict[str, list[str]] = {}
DEFAULT_ASSETS = ROOT / "runs" / "_assets"  # model.assets_dir's default: where builtin:* goes


@dataclass
class Assets:
    """What one size's step reads."""

    policy: Path
    reward: Path  # the policy with a fresh scalar head
    prompts: Path
    max_prompt_tokens: int


def reward_model(policy: Path, out: Path) -> Path:
    """The policy with a fresh scalar head (seed 1), saved once into ``out`` with its
    tokenizer (and so its chat template)."""
    if not (out / "config.json").is_file():
        import torch

        from rlhf_dist.models import load_reward_model, load_tokenizer

        torch.manual_seed(1)
        load_reward_model(str(policy), new_head=True).save_pretrained(out)
        load_tokenizer(str(policy)).save_pretrained(out)
    return out


def build(workdir: Path, name: str, assets_dir: Path) -> Assets:
    """Policy, tokenizer, prompts and a reward model (the policy with a fresh scalar head)."""
    if name == REAL:
        from rlhf_dist.tasks import smollm2, wordmath

        policy = smollm2.build_assets(assets_dir / smollm2.NAME)
        prompts = wordmath.build_assets(assets_dir / "wordmath") / wordmath.FILES["prompts"]
        rm = reward_model(policy, workdir / name / "reward")
        return Assets(policy, rm, prompts, wordmath.MAX_PROMPT_TOKENS)
    from rlhf_dist.tasks.tiny import build_assets

    n_layer, n_embd, n_head = GPT2_SIZES[name]
    assets = build_assets(workdir / name, n_layer=n_layer, n_embd=n_embd, n_head=n_head)
    rm = reward_model(assets / "policy", assets / "reward")
    return Assets(assets / "policy", rm, assets / "prompts.jsonl", GPT2_PROMPT_TOKENS)


class System:
    """The system on a local Ray cluster, one recorded synchronous step per call."""

    def __init__(self, assets: Assets, run_dir: Path, steps: int, overrides: list[str]):
        import ray

        from rlhf_dist.config import load_config
        from rlhf_dist.launch import init_ray
        from rlhf_dist.orchestrator import Orchestrator
        from rlhf_dist.preflight import resolve_inputs

        self.cfg = load_config(
            None,
            [
                f"model.policy={assets.policy}",
                f"reward.model={assets.reward}",
                f"data.prompts={assets.prompts}",
                f"run.steps={steps}",
                f"run.dir={run_dir}",
                "mode=sync",
                "learner.num_workers=1",
                f"rollout.prompts_per_step={PROMPTS}",
                f"rollout.max_new_tokens={NEW_TOKENS}",
                f"rollout.max_prompt_tokens={assets.max_prompt_tokens}",
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
        self.inputs = self.orch.inputs  # the prompts as rendered (chat template) for the policy

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

    def __init__(self, assets: Assets, cfg, inputs, cursor, seed: int = 0):
        """``cfg``, ``inputs``: the system's config and resolved inputs, whose prompts (as the
        system rendered them), sampling settings and chat mode this side uses."""
        import torch

        from rlhf_dist.models import (
            load_critic,
            load_policy,
            load_reward_model,
            load_tokenizer,
            stop_token_ids,
        )
        from rlhf_dist.roles.deepspeed_rank import fused_adam_ok

        torch.set_num_threads(os.cpu_count() or 1)
        torch.manual_seed(seed)
        policy = str(assets.policy)
        self.tok = load_tokenizer(policy, padding_side="left")
        self.rm_tok = load_tokenizer(str(assets.reward), padding_side="right")
        self.sampler = load_policy(policy).eval()
        self.policy = load_policy(policy).eval()  # dropout off, as the learner has it
        self.ref = load_policy(policy).eval().requires_grad_(False)
        self.critic = load_critic(policy).eval()
        self.reward = load_reward_model(str(assets.reward)).eval().requires_grad_(False)
        # the fused kernel where torch has it, as the learner uses: the plain side's best
        fused = {"fused": True} if fused_adam_ok(torch.device("cpu")) else {}
        self.opt_p = torch.optim.AdamW(self.policy.parameters(), lr=1e-5, weight_decay=0.0, **fused)
        self.opt_v = torch.optim.AdamW(self.critic.parameters(), lr=5e-5, weight_decay=0.0, **fused)
        # as the generators sample: their stop tokens (the tokenizer's EOS and the generation
        # config's), temperature, top-p and top-k (0: off; HF's own default would be 50)
        self.stop_ids = stop_token_ids(self.tok, self.sampler)
        rollout = cfg.rollout
        self.temperature = rollout.temperature
        self.sampling = dict(
            temperature=rollout.temperature, top_p=rollout.top_p, top_k=rollout.top_k
        )
        # the texts the generators read (chat rows rendered with the template, which holds
        # the special tokens), and for the reward model each row's messages
        self.prompts, self.messages = inputs.prompts, inputs.prompt_messages
        self.add_special_tokens = inputs.add_special_tokens
        self.chat_template = cfg.data.chat_template
        # the system's prompt order (its cursor, replayed): both sides see the same prompts,
        # so the same prompt widths, step by step
        self.cursor, self.seed = cursor, seed

    def step(self) -> dict:
        import torch

        from rlhf_dist import algo
        from rlhf_dist.chat import encode, reward_input
        from rlhf_dist.models import response_logprobs, response_values, reward_text

        times = {}
        t_step = t0 = time.perf_counter()
        ids = self.cursor.take(PROMPTS)
        prompts = [self.prompts[i] for i in ids]
        tok, temp = self.tok, self.temperature
        with torch.no_grad():
            enc = tok(
                prompts,
                return_tensors="pt",
                padding=True,
                add_special_tokens=self.add_special_tokens,
            )
            out = self.sampler.generate(
                **enc,
                do_sample=True,
                max_new_tokens=NEW_TOKENS,
                **self.sampling,
                pad_token_id=tok.pad_token_id,
                eos_token_id=self.stop_ids,
                return_dict_in_generate=True,
                output_logits=True,
            )
            P = enc.input_ids.shape[1]
            response = out.sequences[:, P:]
            logits = torch.stack(out.logits, 1).float()
            algo.logprobs_from_logits(logits / temp if temp != 1.0 else logits, response)
            is_eos = torch.isin(response, torch.tensor(self.stop_ids))
            after = (is_eos.long().cumsum(-1) - is_eos.long()) > 0
            mask = (~after).float()
            response = response.masked_fill(after, tok.pad_token_id)
            seq = torch.cat([enc.input_ids, response], 1)
            am = torch.cat([enc.attention_mask, mask.long()], 1)
            texts = tok.batch_decode(response, skip_special_tokens=True)
        times["generate"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        with torch.no_grad():
            if self.messages is None:
                pairs = [(reward_text(p, r), True) for p, r in zip(prompts, texts)]
            else:  # the conversation in the reward model's own template, as the scorer reads it
                pairs = [
                    reward_input(self.rm_tok, self.messages[i], r, self.chat_template)
                    for i, r in zip(ids, texts)
                ]
            renc = encode(
                self.rm_tok, [t for t, _ in pairs], [s for _, s in pairs], truncation=True
            )
            scores = self.reward(**renc).logits[:, 0].float()
            ref_logp = response_logprobs(self.ref, seq, am, P, temp)[0] * mask
        times["score"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        with torch.no_grad():
            old_logp = response_logprobs(self.policy, seq, am, P, temp)[0]
            old_values = response_values(self.critic, seq, am, P) * mask
            rewards, _ = algo.kl_penalized_rewards(scores, old_logp, ref_logp, mask, 0.05, "k1")
            adv, returns = algo.gae_advantages(rewards, old_values, mask, 1.0, 0.95)
            adv = algo.masked_whiten(adv, mask)
        perm = torch.randperm(PROMPTS)
        for start in range(0, PROMPTS, MINIBATCH):
            i = perm[start : start + MINIBATCH]
            s, a, m = seq[i], am[i], mask[i]
            logp, ent = response_logprobs(self.policy, s, a, P, temp, with_entropy=True)
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


def run_size(name: str, steps: int, overrides: list[str], workdir: Path, assets_dir: Path) -> dict:
    assets = build(workdir, name, assets_dir)
    system = System(assets, workdir / f"run-{name}", steps, [*LAYOUTS.get(name, []), *overrides])
    try:
        from rlhf_dist.data import PromptCursor

        cfg, inputs = system.cfg, system.inputs
        cursor = PromptCursor(len(inputs.prompts), cfg.run.seed, cfg.data.shuffle)
        plain = Plain(assets, cfg, inputs, cursor)
        sys_rows, plain_rows = [], []
        for i in range(steps):  # turns: system first on even steps, plain first on odd ones
            order = [(system, sys_rows), (plain, plain_rows)]
            for side, rows in order if i % 2 == 0 else order[::-1]:
                rows.append(side.step())
            s, p = sys_rows[-1]["step"], plain_rows[-1]["step"]
            print(f"{name} step {i}: system {s:.3f} s, plain {p:.3f} s", file=sys.stderr)
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
    ratios, over = [], []
    for name, r in results.items():
        s, p = r["step"]
        ratios.append(f"{name} {s / p:.2f}x (target <= {TARGETS[name]}x)")
        if name in BLOCK_TARGETS:
            limit = BLOCK_TARGETS[name]
            above = [f"{b} {r[b][0] / r[b][1]:.2f}x" for b in BLOCKS if r[b][0] > limit * r[b][1]]
            over.append(f"{name} (<= {limit}x): {', '.join(above) or 'none'}")
    lines.append("")
    lines.append("step ratio (system / plain): " + ", ".join(ratios))
    if over:
        lines.append("blocks over their target: " + "; ".join(over))
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--sizes", default="tiny,10m,30m", help=f"comma list of {SIZES}")
    ap.add_argument("--steps", type=int, default=6, help="steps per side (the first is dropped)")
    ap.add_argument(
        "--assets",
        type=Path,
        default=DEFAULT_ASSETS,
        help="where 135m's model is converted once and its prompts written, and found "
        f"afterwards (default: model.assets_dir's, {DEFAULT_ASSETS})",
    )
    ap.add_argument("overrides", nargs="*", help="config overrides for the system's side")
    args = ap.parse_args()
    sizes = args.sizes.split(",")
    for name in sizes:
        if name not in SIZES:
            ap.error(f"unknown size {name!r}: expected some of {SIZES}")
    if args.steps < 2:
        ap.error("--steps: at least 2 (the first step of each side is dropped)")
    results = {}
    with tempfile.TemporaryDirectory() as d:
        for name in sizes:
            results[name] = run_size(name, args.steps, args.overrides, Path(d), args.assets)
            print(f"done {name}", file=sys.stderr)
    print(table(results))


if __name__ == "__main__":
    main()
