"""The driver's top level: it starts the worker groups, runs a loop and records each step.

prompts ─▶ generators ─▶ rollouts ─┬▶ reward scorers ────┐
                                   └▶ reference scorers ─┴▶ scored batch ─▶ learner ranks
        ▲                                                                        │
        └───────────── weight sync: learner rank 0 ─▶ every generator ◀──────────┘

The groups (``rlhf_dist/driver/*_group.py``) own their workers; the loops
(``driver/sync_loop.py``, ``driver/async_loop.py``) sequence them and yield a
``StepOutcome`` per step; ``record`` books it. docs/architecture.md tells the whole story.
"""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from pathlib import Path

from tqdm import tqdm

from rlhf_dist import metric_keys as K
from rlhf_dist.config import Config, dump_config, validate
from rlhf_dist.dispatch import LOST, failed_to_start
from rlhf_dist.driver import checkpoints
from rlhf_dist.driver.async_loop import AsyncLoop
from rlhf_dist.driver.errors import GroupError, NonFiniteSteps, TrainingError, WeightSyncError
from rlhf_dist.driver.evaluation import Evaluator
from rlhf_dist.driver.generator_group import GeneratorGroup
from rlhf_dist.driver.learner_group import LearnerGroup
from rlhf_dist.driver.outcome import (
    StepOutcome,
    skipped_row,
    step_line,
    step_row,
    system_metrics,
)
from rlhf_dist.driver.run_state import RestartBudget, RunState
from rlhf_dist.driver.scorer_group import ScorerGroup
from rlhf_dist.driver.sync_group import WeightSyncGroup
from rlhf_dist.driver.sync_loop import SyncLoop
from rlhf_dist.ledger import SampleLedger, data_epochs, ledger_rows
from rlhf_dist.pools import PoolError, check_cluster_resources
from rlhf_dist.preflight import Inputs
from rlhf_dist.roles import Learner
from rlhf_dist.tracking import Tracker

__all__ = ["Orchestrator", "TrainingError", "WeightSyncError"]


class Orchestrator:
    def __init__(
        self, cfg: Config, inputs: Inputs, run_dir: str | Path, tracker: Tracker | None = None
    ):
        self.cfg, self.inputs = cfg, inputs
        self.sizes = validate(cfg)
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        dump_config(cfg, self.run_dir / "config.yaml")
        self.own_tracker = tracker is None
        self.tracker = tracker or Tracker(cfg, self.run_dir)
        samples = cfg.rollout.samples_per_prompt
        self.ledger = SampleLedger(self.run_dir, len(inputs.prompts), samples, cfg.run.ledger)
        self.state = RunState.initial(cfg, len(inputs.prompts))
        self.budget = RestartBudget(self.state.counters, cfg.run.max_restarts)
        self.last_checkpoint: Path | None = None
        self.last_scale_step = 0
        self.t_started = time.perf_counter()
        self.groups: list = []
        try:
            self._start_groups()
        except BaseException:
            self.shutdown()
            raise
        self.evaluator = Evaluator(cfg, inputs.eval_prompts, self.generators, self.scorers)
        self.loop = self._make_loop()

    def _start_groups(self) -> None:
        cfg, inputs = self.cfg, self.inputs
        check_cluster_resources(cfg)
        self.learners = LearnerGroup("learner", Learner, cfg)
        self.groups.append(self.learners)
        self.generators = GeneratorGroup(cfg, inputs, self.budget)
        self.groups.append(self.generators)
        self.scorers = ScorerGroup(cfg, inputs, self.budget)
        self.groups.append(self.scorers)
        self.learners.handshake(inputs.policy, inputs.critic)
        self.generators.connect(WeightSyncGroup(cfg, self.learners), self.state.version)

    def _make_loop(self) -> SyncLoop | AsyncLoop:
        loop = AsyncLoop if self.cfg.mode == "async" else SyncLoop
        groups = (self.generators, self.scorers, self.learners)
        return loop(self.cfg, self.sizes, self.state, self.inputs, *groups)

    # ----------------------------------------------------------------- read-outs and hooks

    @property
    def step_idx(self) -> int:
        return self.state.step

    @property
    def version(self) -> int:
        return self.state.version

    @property
    def on_dispatch(self):
        return self.generators.on_dispatch

    @on_dispatch.setter
    def on_dispatch(self, hook) -> None:
        """``hook(pool name, slot, task index)`` runs after each submission (fault tests)."""
        for part in (self.generators, self.generators.sync, self.scorers):
            part.on_dispatch = hook

    def elapsed(self) -> float:
        """Seconds since this process started PPO (gold score against wall-clock time)."""
        return time.perf_counter() - self.t_started

    # ----------------------------------------------------------------- pool changes

    def add_generators(self, n: int = 1) -> None:
        self.generators.add(n)

    def remove_generators(self, n: int = 1) -> None:
        self.generators.remove(n)

    def sync_weights(self, version: int) -> float:
        """Push the learner's policy to every generator as ``version``."""
        compute = self.generators.push(version)
        self.state.version = version
        return compute

    def autoscale(self, row: dict) -> bool:
        """Add one generator when generation took more than ``rollout.autoscale.generate_frac``
        of the step, below ``max_workers``, out of cooldown, and the cluster has room."""
        auto = self.cfg.rollout.autoscale
        if (
            not auto.max_workers
            or K.TIME_GENERATE not in row
            or len(self.generators) >= auto.max_workers
            or self.state.step - self.last_scale_step < auto.cooldown_steps
            or row[K.TIME_GENERATE] <= auto.generate_frac * row[K.STEP_TIME]
            or not self.generators.has_room()
        ):
            return False
        self.last_scale_step = self.state.step  # a failed attempt waits out the cooldown too
        try:
            self.add_generators(1)
        except PoolError:  # the room was spread over nodes that cannot hold one more
            return False
        return True

    # ----------------------------------------------------------------- recording

    def record(self, out: StepOutcome) -> dict:
        """Book one step's outcome, from either loop: counters, the metrics row (with the
        samples table and the evaluation when due), then autoscaling and the checkpoint when
        due. Returns the row."""
        cfg, state, c = self.cfg, self.state, self.state.counters
        self._write_ledger(out)
        if out.skipped:  # no update, no sync: counted, and the run stops after too many
            c.skipped_steps += 1
            c.bad_streak += 1
            row = skipped_row(out, state, self.elapsed())
            self.tracker.log(row)
            if c.bad_streak >= cfg.run.max_bad_steps:
                raise NonFiniteSteps(
                    f"stopping: {c.bad_streak} consecutive PPO steps had non-finite "
                    f"{', '.join(out.train['reason'])} "
                    f"(run.max_bad_steps={cfg.run.max_bad_steps})"
                )
            return row
        c.bad_streak = 0
        c.prompts_trained += len(out.batch) // cfg.rollout.samples_per_prompt
        kl_coef = state.kl_ctl.value
        state.kl_ctl.update(out.train[K.KL_PER_SEQUENCE], len(out.batch))
        row = step_row(out, state, kl_coef, self.elapsed(), len(self.generators))
        row.update(system_metrics(self._named_pools()))
        every, n = cfg.wandb.table_every, cfg.wandb.table_rows
        if every and state.step % every == 0:
            b = out.batch
            self.tracker.samples(state.step, b.prompts[:n], b.responses[:n], b.scores[:n].tolist())
        if self.evaluator.due(state.step):
            t0 = time.perf_counter()
            row.update(self.evaluator())
            row[K.TIME_EVAL] = time.perf_counter() - t0
        self.tracker.log(row)
        self.autoscale(row)
        every = cfg.checkpoint.every
        if every and (state.step % every == 0 or state.step == cfg.run.steps):
            self.save_checkpoint()
        return row

    def _write_ledger(self, out: StepOutcome) -> None:
        """The step's samples (and any dropped as too stale) into ``samples.jsonl``."""
        if not self.ledger.enabled:
            return
        taken = self.cfg.rollout.prompts_per_step
        epochs = data_epochs(out.data_position["cursor"], self.state.cursor.size, taken)
        trained_by = self.state.version - (0 if out.skipped else 1)  # the update's own version
        why = "nonfinite_step" if out.skipped else ""
        self.ledger.write(ledger_rows(self.state.step, out.batch, epochs, trained_by), why)
        for chunk in out.dropped:
            self.ledger.write(ledger_rows(self.state.step, chunk, epochs, trained_by), "stale")

    def _named_pools(self) -> dict:
        return {
            "learner": self.learners,
            "rollout": self.generators,
            "reward": self.scorers.rewards,
            "reference": self.scorers.references,
        }

    # ----------------------------------------------------------------- checkpoints

    def save_checkpoint(self) -> Path:
        """Learner engines (every rank) plus the run state, committed atomically."""
        self.last_checkpoint = checkpoints.save(
            self.cfg,
            self.run_dir,
            self.state,
            self.learners,
            self.inputs.tokenizer,
            self.loop.pending_state(),
        )
        return self.last_checkpoint

    def restore(self, log=print) -> Path | None:
        """Continue from the newest usable checkpoint; the generators receive the restored
        weights before they sample. Metric rows written after it are set aside."""
        ckpt, pending = checkpoints.load_newest(self.run_dir, self.state, self.learners, log)
        self.ledger.rollback(self.state.step)  # the steps to redo (all of them without one)
        if ckpt is None:
            dropped = self.tracker.rollback(-1)  # every PPO row, step 0's evaluation included
            log(
                f"no usable checkpoint: PPO starts from step 0 ({dropped} earlier PPO rows set aside)"
            )
            return None
        self.sync_weights(self.state.version)
        dropped = self.tracker.rollback(self.state.step)
        self.last_checkpoint = ckpt
        self.loop = self._make_loop()  # it continues from the restored state
        if pending is not None:
            self.loop.load_pending(pending)
        log(
            f"resumed from {ckpt} (step {self.state.step}, policy version {self.state.version}); "
            f"{dropped} metric rows written after it moved to metrics.rolled_back.jsonl"
        )
        return ckpt

    def export_policy(self, out_dir: Path) -> str:
        return self.learners.export(str(out_dir), self.inputs.tokenizer)

    # ----------------------------------------------------------------- running

    def _checkpoint_hint(self) -> str:
        if self.last_checkpoint is None:
            return "no checkpoint was written"
        return (
            f"the last checkpoint is {self.last_checkpoint} "
            f"(continue with: launch.py --resume {self.run_dir})"
        )

    @contextmanager
    def _failures(self):
        """A group's error, or a lost learner rank, ends the run naming the last checkpoint."""
        try:
            yield
        except GroupError as e:
            raise TrainingError(f"{e}; {self._checkpoint_hint()}") from e
        except LOST as e:
            # Generators and scorers are replaced as they go; a learner rank cannot be.
            if failed_to_start(e):
                raise TrainingError(
                    f"a worker failed to start at step {self.state.step + 1}: {e}; "
                    f"{self._checkpoint_hint()}"
                ) from e
            dead = self.learners.dead()
            who = f"learner rank {dead[0]}" if dead else "a worker that could not be replaced"
            raise TrainingError(
                f"{who} died at step {self.state.step + 1} ({e.__class__.__name__}); "
                f"{self._checkpoint_hint()}"
            ) from e

    def step(self) -> dict:
        """One synchronous step, recorded."""
        with self._failures():
            return self.record(self.loop.step())

    def run(self, log=print) -> list[dict]:
        history = []
        self.t_started = time.perf_counter()
        bar = tqdm(
            total=self.cfg.run.steps,
            initial=self.state.step,
            desc="PPO",
            unit="step",
            disable=not sys.stderr.isatty(),  # a log file gets the plain lines only
            dynamic_ncols=True,
        )
        if not bar.disable:
            log = bar.write
        with self._failures():
            if self.evaluator.gold and self.state.step == 0:
                before = {
                    "stage": "ppo",
                    "step": 0,
                    **self.evaluator(),
                    K.ELAPSED: self.elapsed(),
                }
                self.tracker.log(before)
                history.append(before)
                log(step_line(before, self.cfg.run.steps))
            for out in self.loop.steps():
                generators = len(self.generators)
                row = self.record(out)
                history.append(row)
                if len(self.generators) > generators:
                    share = row[K.TIME_GENERATE] / row[K.STEP_TIME]
                    log(
                        f"autoscale: generation took {share:.0%} of the step; now {len(self.generators)} generators"
                    )
                log(step_line(row, self.cfg.run.steps))
                bar.update(1)
        bar.close()
        return history

    def shutdown(self) -> None:
        if getattr(self, "own_tracker", False):
            self.tracker.close()
            self.own_tracker = False
        for group in reversed(self.groups):
            try:
                group.shutdown()
            except Exception:  # best effort: the cluster may already be gone
                pass
        self.groups = []
