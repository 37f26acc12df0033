"""The scorer group: reward scorers and reference scorers, working on a batch concurrently.

Each pool gets the batch in one chunk per worker (bigger forwards; a worker's share is
all load balancing needs when the chunks are equal), dealt by load; a lost scorer is
replaced at once (a scorer holds nothing another cannot rebuild) and its chunk redone.
Reward functions that take fields of the data row (``answer=...``) receive, with each chunk,
those fields alone, for that chunk's samples (the rows ``batch.prompt_ids`` name). With chat
data a reward model receives each sample's prompt messages the same way, to render the
conversation with its own template.
"""

from __future__ import annotations

import math

import torch

from rlhf_dist.batch import RolloutBatch
from rlhf_dist.config import ENV_REWARD, Config
from rlhf_dist.dispatch import Job, deal, split_ranges
from rlhf_dist.driver.healing import replace_lost
from rlhf_dist.driver.run_state import RestartBudget
from rlhf_dist.inputs import Inputs
from rlhf_dist.pools import Pool, bundle_of, worker_threads
from rlhf_dist.roles import ReferenceScorer, RewardScorer
from rlhf_dist.roles.scorers import load_reward_functions


class ScorerGroup:
    def __init__(self, cfg: Config, inputs: Inputs, budget: RestartBudget):
        self.budget = budget
        # reward.function=env: the environment's rewards came with the samples; no scorer
        self.env_reward = cfg.reward.function == ENV_REWARD and not inputs.reward_model
        # The functions' signatures say which data fields travel with the samples.
        self.functions = (
            []
            if inputs.reward_model or self.env_reward
            else load_reward_functions(cfg.reward.function, cfg.reward.weights)
        )
        self.fields = inputs.prompt_fields  # the rows of data.prompts: PPO's prompt_ids
        self.eval_fields = inputs.eval_prompt_fields  # the rows of the held-out prompts
        # chat data: each row's prompt messages, for a reward model's own template
        self.messages = inputs.prompt_messages if inputs.reward_model else None
        self.eval_messages = inputs.eval_prompt_messages if inputs.reward_model else None
        timeout = cfg.ray.placement_timeout_s
        self.rewards = (
            None
            if self.env_reward
            else Pool(
                "reward",
                RewardScorer,
                cfg.reward.num_workers,
                bundle_of(cfg.reward),
                lambda i: (
                    (),
                    dict(
                        model_path=inputs.reward_model,
                        function="" if inputs.reward_model else cfg.reward.function,
                        weights=None if inputs.reward_model else cfg.reward.weights,
                        dtype=cfg.model.dtype,
                        num_gpus=cfg.reward.num_gpus,
                        chat_template=cfg.data.chat_template,
                        timeout_s=cfg.reward.timeout_s,
                    ),
                ),
                timeout,
                threads=worker_threads(cfg, "reward"),
            )
        )
        # reference.from_base: the generators take the reference log-probs from their own
        # base with the LoRA adapters disabled, so no reference scorer is started.
        self.references = None
        if not cfg.reference.from_base:
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
                    threads=worker_threads(cfg, "reference"),
                )
            except BaseException:
                if self.rewards is not None:
                    self.rewards.shutdown()
                raise
        self.on_dispatch = None  # (pool name, slot, task index) after each submission

    @property
    def pools(self) -> list[Pool]:
        return [p for p in (self.rewards, self.references) if p is not None]

    def _job(self, pool: Pool, batch: RolloutBatch, submit) -> Job:
        parts = split_ranges(len(batch), math.ceil(len(batch) / len(pool)))
        return Job(pool, parts, submit, lambda lost, busy: replace_lost(pool, lost, self.budget))

    def _deal(self, *jobs: Job) -> None:
        deal(*jobs, on_dispatch=self.on_dispatch)
        self.budget.redone(sum(j.redone for j in jobs))

    def sample_fields(self, batch: RolloutBatch, table: dict[str, list], functions=None):
        """The data fields ``functions`` (default: the reward functions) take, one value per
        sample of ``batch``, from ``table`` (the rows ``batch.prompt_ids`` index); None when
        they take none."""
        functions = self.functions if functions is None else functions
        wanted = list(dict.fromkeys(k for f in functions for k in f.wanted(table)))
        if not wanted:
            return None
        return {k: [table[k][i] for i in batch.prompt_ids] for k in wanted}

    def _reward_job(self, batch: RolloutBatch, table: dict[str, list], messages=None) -> Job:
        fields = self.sample_fields(batch, table)
        convs = None if messages is None else [messages[i] for i in batch.prompt_ids]

        def submit(a, p):
            chunk = None if fields is None else {k: v[p.start : p.stop] for k, v in fields.items()}
            return a.score.remote(
                batch.prompts[p.start : p.stop],
                batch.responses[p.start : p.stop],
                chunk,
                None if convs is None else convs[p.start : p.stop],
            )

        return self._job(self.rewards, batch, submit)

    def score(self, batch: RolloutBatch) -> float:
        """Reward scores and reference log-probs of ``batch`` (PPO's samples of data.prompts),
        filled in; with several reward functions each one's scores go to
        ``batch.reward_parts``; with ``reward.function=env`` the environment's rewards, which
        came with the samples, are the scores. Returns the slower pool's critical-path
        compute."""
        jobs = []
        if not self.env_reward:
            jobs.append(self._reward_job(batch, self.fields, self.messages))
        if self.references is not None:
            jobs.append(
                self._job(
                    self.references,
                    batch,
                    lambda a, p: a.ref_logprobs.remote(batch.select(list(p))),
                )
            )
        if jobs:
            self._deal(*jobs)
        if not self.env_reward:
            self._take_scores(batch, jobs[0].results)
        elif batch.scores is None:
            raise RuntimeError("reward.function=env: the generators sent no rewards")
        if self.references is None:  # the generators filled batch.ref_logprobs in
            if batch.ref_logprobs is None:
                raise RuntimeError("reference.from_base: the generators sent no ref_logprobs")
        else:
            batch.ref_logprobs = torch.cat([r["ref_logprobs"] for r in jobs[-1].results])
        return max([j.critical_path() for j in jobs], default=0.0)

    @staticmethod
    def _take_scores(batch: RolloutBatch, results: list[dict]) -> None:
        batch.scores = torch.cat([r["scores"] for r in results])
        batch.reward_timeouts = sum(r.get("timeouts", 0) for r in results)
        if "parts" in results[0]:
            names = results[0]["parts"]
            batch.reward_parts = {n: torch.cat([r["parts"][n] for r in results]) for n in names}

    def rewards_of(self, batch: RolloutBatch, table: dict[str, list] | None = None) -> torch.Tensor:
        """The reward scores alone (evaluation's proxy reward). ``table``: the data rows the
        batch's ``prompt_ids`` index; default the held-out prompts'. With
        ``reward.function=env``, the environment's rewards the batch came with."""
        if self.env_reward:
            return batch.scores
        if table is None:
            job = self._reward_job(batch, self.eval_fields, self.eval_messages)
        else:
            job = self._reward_job(batch, table, self.messages)
        self._deal(job)
        return torch.cat([r["scores"] for r in job.results])

    def shutdown(self) -> None:
        for pool in reversed(self.pools):
            pool.shutdown()
