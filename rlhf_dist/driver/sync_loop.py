"""Synchronous mode: one block at a time (docs/architecture.md, "The synchronous step").

prompts ─▶ generators ─▶ rollouts ─┬▶ reward scorers ────┐
                                   └▶ reference scorers ─┴▶ scored batch ─▶ learner ranks
        ▲                                                                        │
        └───────────── weight sync: learner rank 0 ─▶ every generator ◀──────────┘

With ``rollout.drop_uniform_groups`` the generate and score blocks repeat until the batch
holds ``prompts_per_step`` prompts whose rewards differ (``driver/dynamic_sampling.py``).
"""

from __future__ import annotations

import time

from rlhf_dist import metric_keys as K
from rlhf_dist.dispatch import chunk_plan, derive_seed
from rlhf_dist.driver.dynamic_sampling import (
    fill_size,
    merge_rounds,
    shift_origins,
    split_uniform,
    take_first_groups,
)
from rlhf_dist.driver.errors import NoSignal
from rlhf_dist.driver.outcome import BlockTimer, StepLoop, StepOutcome, publish
from rlhf_dist.ledger import SURPLUS, UNIFORM


class SyncLoop(StepLoop):
    def step(self) -> StepOutcome:
        cfg, state, timer = self.cfg, self.state, BlockTimer()
        t_step = time.perf_counter()
        batch, score_compute, sampled, counts = self._sample_and_score(timer)
        position = state.data_position()
        with timer.block("train"):
            seed = derive_seed(cfg.run.seed, state.step, "ppo")
            train = self.learners.update(batch, state.kl_ctl.value, seed)
        state.step += 1
        if train.skipped:  # no update: nothing to send
            return StepOutcome(
                batch, train, timer.times, time.perf_counter() - t_step, position, **sampled
            )
        with timer.block("weight_sync"):
            sync_compute = publish(self.generators, state, state.version + 1)
        step_time = time.perf_counter() - t_step
        compute = batch.compute_s + score_compute + train.compute_s + sync_compute
        extra = {
            K.GENERATE_TOKENS_PER_S: batch.generated_tokens / max(timer.times["generate"], 1e-9),
            K.OVERHEAD_FRAC: max(step_time - compute, 0.0) / step_time,
            K.SYNC_BYTES: self.generators.pushed_bytes,
        }
        if cfg.rollout.drop_uniform_groups:
            extra.update(counts)
        return StepOutcome(batch, train, timer.times, step_time, position, extra, **sampled)

    def _sample_and_score(self, timer: BlockTimer) -> tuple:
        """The step's scored batch: one round of sampling, or with dynamic sampling as many as
        it takes to fill the batch with prompts whose rewards differ. Returns (batch, scoring
        compute seconds, what the ``StepOutcome`` needs to know of the rounds, their counts)."""
        cfg, state = self.cfg, self.state
        want, group = cfg.rollout.prompts_per_step, cfg.rollout.samples_per_prompt
        rounds, kept, dropped = [], [], []
        have = taken = chunks_before = dropped_groups = 0
        score_compute = 0.0
        while have < want:
            if len(rounds) > cfg.rollout.max_fill_rounds:
                raise NoSignal(
                    f"step {state.step + 1}: {len(rounds)} rounds of sampling found {have} of "
                    f"{want} prompts whose samples' rewards differ (rollout.drop_uniform_groups"
                    f"); on this data the rewards give almost no learning signal (raise "
                    f"rollout.max_fill_rounds={cfg.rollout.max_fill_rounds}, or turn "
                    f"rollout.drop_uniform_groups off)"
                )
            prompt_ids = state.take_prompts(fill_size(want, have, taken))
            fill = ("fill", len(rounds)) if rounds else ()  # round 0: the plain step's seeds
            chunks = chunk_plan(
                prompt_ids, self.sizes.chunk_prompts, cfg.run.seed, "rollout", state.step, *fill
            )
            with timer.block("generate"):
                batch = self.generators.generate(
                    chunks, self.inputs.prompts, cfg.rollout.samples_per_prompt
                )
            shift_origins(batch, taken, chunks_before)
            taken, chunks_before = taken + len(prompt_ids), chunks_before + len(chunks)
            with timer.block("score"):
                score_compute += self.scorers.score(batch)
            rounds.append(batch)
            if not cfg.rollout.drop_uniform_groups:
                kept.append(batch)
                break
            good, uniform, n = split_uniform(batch, group)
            if have + len(good) // group > want:  # the last round found more than it lacked
                good, surplus = take_first_groups(good, want - have, group)
                dropped.append((surplus, SURPLUS))
            kept.append(good)
            have += len(good) // group
            dropped_groups += n
            if n:
                dropped.append((uniform, UNIFORM))
        merged = merge_rounds(kept, rounds, self.inputs.pad_token_id)
        counts = {K.DROPPED_GROUPS: dropped_groups, K.FILL_ROUNDS: len(rounds) - 1}
        return merged, score_compute, {"taken": taken, "dropped": dropped}, counts

    def steps(self):
        while self.state.step < self.cfg.run.steps:
            yield self.step()
