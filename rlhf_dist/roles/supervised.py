"""The two supervised stages of the recipe, on the same DeepSpeed rank code as PPO:

- :class:`SFTLearner`: next-token cross-entropy on demonstrations, loss on response tokens only.
- :class:`RewardLearner`: a scalar-head sequence classifier fitted to comparisons with the
  Bradley-Terry loss ``-log sigmoid(r(chosen) - r(rejected))`` (InstructGPT, eq. 1).

Each ``train_step`` receives this rank's share of one optimizer step and runs it as
micro-batches that DeepSpeed accumulates; metrics come back summed over all ranks.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from rlhf_dist.chat import encode, record_template, reward_input, sft_tokens
from rlhf_dist.models import load_policy, load_reward_model, load_tokenizer
from rlhf_dist.roles.deepspeed_rank import DeepSpeedRank


class _SupervisedRank(DeepSpeedRank):
    section = ""  # "sft" or "rm": the config section with batch sizes and learning rate

    def _sizes(self) -> tuple[int, int]:
        sec = getattr(self.cfg, self.section)
        micro = sec.micro_batch_size
        return micro, sec.batch_size // self.world_size // micro

    def _build(self, model, tokenizer_path: str) -> dict:
        micro, accum = self._sizes()
        self.tokenizer = load_tokenizer(tokenizer_path, padding_side="right")
        self.engine = self.make_engine(model, getattr(self.cfg, self.section).lr, micro, accum)
        n = sum(getattr(p, "ds_numel", p.numel()) for p in self.engine.module.parameters())
        return {"params": n}

    def _run(self, records: list[dict], train: bool) -> dict:
        """Sum of per-micro-batch metrics over this rank's records, then over all ranks."""
        t0 = time.perf_counter()
        micro, _ = self._sizes()
        self.engine.train(train)
        sums: dict[str, float] = {}
        for i in range(0, len(records), micro):
            with torch.set_grad_enabled(train):
                loss, stats = self._loss(records[i : i + micro])
            if train:
                self.engine.backward(loss)
                self.engine.step()
            for k, v in stats.items():
                sums[k] = sums.get(k, 0.0) + float(v)
        keys = sorted(sums)
        total = self.all_reduce_sum(torch.tensor([sums[k] for k in keys], dtype=torch.float64))
        out = dict(zip(keys, total.tolist()))
        out["compute_s"] = time.perf_counter() - t0
        return out

    def train_step(self, records: list[dict]) -> dict:
        return self._run(records, train=True)

    def evaluate(self, records: list[dict]) -> dict:
        return self._run(records, train=False)

    def export_model(self, out_dir: str, tokenizer_path: str) -> str | None:
        return self.export(self.engine.module, out_dir, tokenizer_path)


class SFTLearner(_SupervisedRank):
    section = "sft"

    def setup(self, init_path: str, tokenizer_path: str, master_addr: str, master_port: int):
        self.init_distributed(master_addr, master_port)
        model = load_policy(init_path, self.cfg.model.dtype)
        model = self.with_lora(model, "sft", "causal", init_path)
        return self._build(model, tokenizer_path)

    def _loss(self, records: list[dict]):
        """Token-mean cross-entropy of ``response + EOS`` given the prompt, tokenised as the
        generators tokenise prompts (so the policy continues exactly where it learnt to); a
        chat record (``rlhf_dist.chat.sft_tokens``) trains on its assistant turns only."""
        tok = self.tokenizer
        mode = self.cfg.data.chat_template
        rows, labels = [], []
        for r in records:
            prompt, response = (
                (r["messages"], None) if "messages" in r else (r["prompt"], r["response"])
            )
            chat, template = record_template(mode, tok, prompt, response)
            row, label = sft_tokens(tok, prompt, response, template, chat)
            rows.append(row)
            labels.append(label)
        width = max(map(len, rows))
        ids = torch.full((len(rows), width), tok.pad_token_id, dtype=torch.long)
        lab = torch.full((len(rows), width), -100, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, (row, lb) in enumerate(zip(rows, labels)):
            ids[i, : len(row)] = torch.tensor(row)
            lab[i, : len(lb)] = torch.tensor(lb)
            mask[i, : len(row)] = 1
        ids, lab, mask = ids.to(self.device), lab.to(self.device), mask.to(self.device)
        logits = self.engine(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
        target = lab[:, 1:]
        nll = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="sum"
        )
        tokens = (target != -100).sum()
        loss = nll / tokens.clamp(min=1)
        return loss, {"nll_sum": nll.detach(), "tokens": tokens, "examples": len(records)}


class RewardLearner(_SupervisedRank):
    section = "rm"

    def setup(self, init_path: str, tokenizer_path: str, master_addr: str, master_port: int):
        self.init_distributed(master_addr, master_port)
        model = load_reward_model(init_path, self.cfg.model.dtype, new_head=True)
        tok = load_tokenizer(tokenizer_path)
        model.config.pad_token_id = tok.pad_token_id  # the classifier reads the last real token
        model = self.with_lora(model, "rm", "seq_cls", init_path)
        return self._build(model, tokenizer_path)

    def _rewards(self, prompts: list, responses: list) -> torch.Tensor:
        """Rewards of the conversations, rendered as the PPO reward scorer renders them
        (``rlhf_dist.chat.reward_input``)."""
        mode = self.cfg.data.chat_template
        inputs = [reward_input(self.tokenizer, p, r, mode) for p, r in zip(prompts, responses)]
        enc = encode(self.tokenizer, [t for t, _ in inputs], [s for _, s in inputs])
        return self.engine(**enc.to(self.device)).logits[:, 0].float()

    def _loss(self, records: list[dict]):
        prompts = [r["prompt"] for r in records]
        # chosen and rejected in one forward pass
        rewards = self._rewards(
            prompts + prompts,
            [r["chosen"] for r in records] + [r["rejected"] for r in records],
        )
        chosen, rejected = rewards[: len(records)], rewards[len(records) :]
        margin = chosen - rejected
        loss = -F.logsigmoid(margin).mean()
        return loss, {
            "loss_sum": loss.detach() * len(records),
            "correct": (margin > 0).sum(),
            "pairs": len(records),
            "margin_sum": margin.detach().sum(),
        }
