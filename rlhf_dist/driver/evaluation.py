"""Evaluation: the gold score of the current policy on held-out prompts.

The gold scorer plays the human labeler; it never trains anything. Each evaluation samples
the same held-out prompts with the same seeds (step 0's chunk plan, one sample each), so two
evaluations differ by the policy only. The proxy reward of the same samples sits beside it.
A gold function may take fields of the held-out rows, as reward functions do
(``gold(prompts, responses, answer)``): a verifiable task's held-out accuracy.
"""

from __future__ import annotations

import math

import torch

from rlhf_dist import metric_keys as K
from rlhf_dist.config import Config
from rlhf_dist.dispatch import chunk_plan
from rlhf_dist.driver.generator_group import GeneratorGroup
from rlhf_dist.driver.scorer_group import ScorerGroup
from rlhf_dist.roles.scorers import RewardFunction

SHOWN = 4  # held-out samples kept from each evaluation (eval_samples.jsonl)


class Evaluator:
    def __init__(
        self, cfg: Config, prompts: list[str], generators: GeneratorGroup, scorers: ScorerGroup
    ):
        self.cfg, self.prompts = cfg, prompts
        self.generators, self.scorers = generators, scorers
        self.gold = RewardFunction.load(cfg.eval.gold) if cfg.eval.gold else None
        self.fields = scorers.eval_fields  # the held-out rows' other fields
        self.samples: list[dict] = []  # a few of the last evaluation's samples

    def due(self, step: int) -> bool:
        """Before PPO (step 0), every ``eval.every`` steps and after the last one."""
        if self.gold is None:
            return False
        return step % self.cfg.eval.every == 0 or step == self.cfg.run.steps

    def __call__(self) -> dict:
        n = len(self.prompts)
        size = math.ceil(n / (2 * self.cfg.rollout.num_workers))
        chunks = chunk_plan(list(range(n)), size, self.cfg.run.seed, "eval", 0)
        batch = self.generators.generate(chunks, self.prompts, samples=1, held_out=True)
        fields = self.scorers.sample_fields(batch, self.fields, [self.gold])
        gold = torch.tensor(self.gold(batch.prompts, batch.responses, fields), dtype=torch.float64)
        self.samples = [  # a few, as the run's summary shows them (before and after training)
            {"prompt": p, "response": r, "gold": float(g)}
            for p, r, g in zip(batch.prompts[:SHOWN], batch.responses[:SHOWN], gold[:SHOWN])
        ]
        proxy = self.scorers.rewards_of(batch)  # the held-out rows (and messages)
        return {
            K.GOLD: gold.mean().item(),
            K.GOLD_STDERR: (gold.std().item() / n**0.5) if n > 1 else 0.0,
            K.EVAL_PROXY_REWARD: proxy.mean().item(),
            K.EVAL_RESPONSE_LENGTH_MEAN: batch.response_mask.sum(-1).float().mean().item(),
            K.EVAL_NUM_PROMPTS: n,
        }
