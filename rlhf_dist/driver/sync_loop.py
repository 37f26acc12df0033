"""Synchronous mode: one block at a time (docs/architecture.md, "The synchronous step").

prompts ─▶ generators ─▶ rollouts ─┬▶ reward scorers ────┐
                                   └▶ reference scorers ─┴▶ scored batch ─▶ learner ranks
        ▲                                                                        │
        └───────────── weight sync: learner rank 0 ─▶ every generator ◀──────────┘
"""

from __future__ import annotations

import time

from rlhf_dist import metric_keys as K
from rlhf_dist.dispatch import chunk_plan, derive_seed
from rlhf_dist.driver.outcome import BlockTimer, StepLoop, StepOutcome


class SyncLoop(StepLoop):
    def step(self) -> StepOutcome:
        cfg, state, timer = self.cfg, self.state, BlockTimer()
        t_step = time.perf_counter()
        prompt_ids = state.take_prompts(cfg.rollout.prompts_per_step)
        position = state.data_position()
        chunks = chunk_plan(
            prompt_ids, self.sizes.chunk_prompts, cfg.run.seed, "rollout", state.step
        )
        with timer.block("generate"):
            batch = self.generators.generate(
                chunks, self.inputs.prompts, cfg.rollout.samples_per_prompt
            )
        with timer.block("score"):
            score_compute = self.scorers.score(batch)
        with timer.block("train"):
            seed = derive_seed(cfg.run.seed, state.step, "ppo")
            train = self.learners.update(batch, state.kl_ctl.value, seed)
        state.step += 1
        if train.get("skipped"):  # no update: nothing to send
            return StepOutcome(batch, train, timer.times, time.perf_counter() - t_step, position)
        with timer.block("weight_sync"):
            sync_compute = self.generators.push(state.version + 1)
            state.version += 1
        step_time = time.perf_counter() - t_step
        compute = batch.extra["compute_s"] + score_compute + train["compute_s"] + sync_compute
        extra = {
            K.GENERATE_TOKENS_PER_S: batch.extra["num_tokens"] / max(timer.times["generate"], 1e-9),
            K.OVERHEAD_FRAC: max(step_time - compute, 0.0) / step_time,
            K.SYNC_BYTES: self.generators.pushed_bytes,
        }
        return StepOutcome(batch, train, timer.times, step_time, position, extra)

    def steps(self):
        while self.state.step < self.cfg.run.steps:
            yield self.step()
