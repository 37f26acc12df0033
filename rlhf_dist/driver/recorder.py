"""Booking a step's outcome, whichever loop ran it (docs/architecture.md, "Recording a step").

``Recorder.book`` is the one place a step's numbers go: the ledger's lines, the counters, the
KL controller, the metric row (with the pools' resource use, the samples table and the
evaluation when due) and the tracker. It takes what it needs of the worker groups as plain
callables, so it runs, and is tested, without Ray (``tests/driver/``); the orchestrator adds
what acts on the groups (autoscaling, checkpoints).
"""

from __future__ import annotations

import time
from collections.abc import Callable

from rlhf_dist import metric_keys as K
from rlhf_dist.config import Config
from rlhf_dist.driver.errors import NonFiniteSteps
from rlhf_dist.driver.outcome import StepOutcome, skipped_row, step_row
from rlhf_dist.driver.run_state import RunState
from rlhf_dist.ledger import SampleLedger


class Recorder:
    def __init__(
        self,
        cfg: Config,
        state: RunState,
        tracker,
        ledger: SampleLedger,
        clock: Callable[[], float],
        evaluate: Callable[[int], dict | None] = lambda step: None,
        system: Callable[[], dict] = dict,
        generators: Callable[[], int] = lambda: 0,
    ):
        """``clock``: seconds since PPO started; ``evaluate(step)``: the evaluation's metrics
        when one is due at ``step`` (None otherwise); ``system``: the pools' resource use;
        ``generators``: how many generators there are now."""
        self.cfg, self.state, self.tracker, self.ledger = cfg, state, tracker, ledger
        self.clock, self.evaluate, self.system, self.generators = (
            clock,
            evaluate,
            system,
            generators,
        )

    def _check_trained(self, out: StepOutcome) -> None:
        """The learner's own count of what it trained (``UpdateResult.trained``) against the
        batch it was sent: every sample ``ppo.epochs`` times (none for a skipped step). A
        learner that silently skipped or repeated a sample stops the run, after the ledger
        booked what it did."""
        trained, want = out.train.trained, 0 if out.skipped else self.cfg.ppo.epochs
        if not trained and out.skipped:
            return
        wrong = [i for i, n in enumerate(trained) if n != want]
        if len(trained) != len(out.batch) or wrong:
            raise RuntimeError(
                f"step {self.state.step}: the learner trained {len(trained)} samples of the "
                f"{len(out.batch)} it was sent, samples {wrong[:8]} not {want} times "
                f"(ppo.epochs={self.cfg.ppo.epochs}; samples.jsonl has its counts)"
            )

    def book(self, out: StepOutcome) -> dict:
        """Book one step: the ledger, the counters, the metric row. A skipped step (non-finite
        numbers: no update, no sync) is counted and logged, and ``run.max_bad_steps`` of them
        in a row stop the run (``NonFiniteSteps``). Returns the row."""
        cfg, state, c = self.cfg, self.state, self.state.counters
        self.ledger.write_step(out, state, cfg.rollout.prompts_per_step)
        self._check_trained(out)
        if out.skipped:
            c.skipped_steps += 1
            c.bad_streak += 1
            row = skipped_row(out, state, self.clock())
            self.tracker.log(row)
            if c.bad_streak >= cfg.run.max_bad_steps:
                raise NonFiniteSteps(
                    f"stopping: {c.bad_streak} consecutive PPO steps had non-finite "
                    f"{', '.join(out.train.skipped)} "
                    f"(run.max_bad_steps={cfg.run.max_bad_steps})"
                )
            return row
        c.bad_streak = 0
        c.prompts_trained += len(out.batch) // cfg.rollout.samples_per_prompt
        kl_coef = state.kl_ctl.value
        state.kl_ctl.update(out.train.metrics[K.KL_PER_SEQUENCE], len(out.batch))
        row = step_row(out, state, kl_coef, self.clock(), self.generators())
        row.update(self.system())
        every, n = cfg.wandb.table_every, cfg.wandb.table_rows
        if every and state.step % every == 0:
            b = out.batch
            self.tracker.samples(state.step, b.prompts[:n], b.responses[:n], b.scores[:n].tolist())
        t0 = time.perf_counter()
        evaluation = self.evaluate(state.step)
        if evaluation is not None:
            row.update(evaluation)
            row[K.TIME_EVAL] = time.perf_counter() - t0
        self.tracker.log(row)
        return row
