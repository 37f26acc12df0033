"""The scorer group: reward scorers and reference scorers, working on a batch concurrently.

Each pool gets the batch in chunks (about two per worker), dealt by load; a lost scorer is
replaced at once (a scorer holds nothing another cannot rebuild) and its chunk redone.
"""

from __future__ import annotations

import math

import torch

from rlhf_dist.batch import RolloutBatch
from rlhf_dist.config import Config
from rlhf_dist.dispatch import Job, deal, split_ranges
from rlhf_dist.driver.healing import replace_lost
from rlhf_dist.driver.run_state import RestartBudget
from rlhf_dist.pools import Pool, bundle_of
from rlhf_dist.preflight import Inputs
from rlhf_dist.roles import ReferenceScorer, RewardScorer


class ScorerGroup:
    def __init__(self, cfg: Config, inputs: Inputs, budget: RestartBudget):
        self.budget = budget
        timeout = cfg.ray.placement_timeout_s
        self.rewards = Pool(
            "reward",
            RewardScorer,
            cfg.reward.num_workers,
            bundle_of(cfg.reward),
            lambda i: (
                (),
                dict(
                    model_path=inputs.reward_model,
                    function="" if inputs.reward_model else cfg.reward.function,
                    dtype=cfg.model.dtype,
                    num_gpus=cfg.reward.num_gpus,
                ),
            ),
            timeout,
        )
        try:
            self.references = Pool(
                "reference",
                ReferenceScorer,
                cfg.reference.num_workers,
                bundle_of(cfg.reference),
                lambda i: (
                    (inputs.policy, cfg.model.dtype),
                    dict(temperature=cfg.rollout.temperature, num_gpus=cfg.reference.num_gpus),
                ),
                timeout,
            )
        except BaseException:
            self.rewards.shutdown()
            raise
        self.on_dispatch = None  # (pool name, slot, task index) after each submission

    @property
    def pools(self) -> list[Pool]:
        return [self.rewards, self.references]

    def _job(self, pool: Pool, batch: RolloutBatch, submit) -> Job:
        parts = split_ranges(len(batch), math.ceil(len(batch) / (2 * len(pool))))
        return Job(pool, parts, submit, lambda lost, busy: replace_lost(pool, lost, self.budget))

    def _deal(self, *jobs: Job) -> None:
        deal(*jobs, on_dispatch=self.on_dispatch)
        self.budget.redone(sum(j.redone for j in jobs))

    def _reward_job(self, batch: RolloutBatch) -> Job:
        return self._job(
            self.rewards,
            batch,
            lambda a, p: a.score.remote(
                batch.prompts[p.start : p.stop], batch.responses[p.start : p.stop]
            ),
        )

    def score(self, batch: RolloutBatch) -> float:
        """Reward scores and reference log-probs of ``batch``, filled in; returns the slower
        pool's critical-path compute."""
        rewards = self._reward_job(batch)
        refs = self._job(
            self.references, batch, lambda a, p: a.ref_logprobs.remote(batch.select(list(p)))
        )
        self._deal(rewards, refs)
        batch.scores = torch.cat([r["scores"] for r in rewards.results])
        batch.ref_logprobs = torch.cat([r["ref_logprobs"] for r in refs.results])
        return max(rewards.critical_path(), refs.critical_path())

    def rewards_of(self, batch: RolloutBatch) -> torch.Tensor:
        """The reward scores alone (evaluation's proxy reward)."""
        job = self._reward_job(batch)
        self._deal(job)
        return torch.cat([r["scores"] for r in job.results])

    def shutdown(self) -> None:
        for pool in (self.references, self.rewards):
            pool.shutdown()
