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

import json
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from tqdm import tqdm

from rlhf_dist import metric_keys as K
from rlhf_dist.config import Config, dump_config, validate
from rlhf_dist.driver import checkpoints
from rlhf_dist.driver.async_loop import AsyncLoop
from rlhf_dist.driver.errors import (
    GroupError,
    LearnerLost,
    RestartsExhausted,
    TrainingError,
    WeightSyncError,
    WorkerFailedToStart,
)
from rlhf_dist.driver.evaluation import Evaluator
from rlhf_dist.driver.generator_group import GeneratorGroup
from rlhf_dist.driver.learner_group import LearnerGroup
from rlhf_dist.driver.outcome import (
    StepOutcome,
    publish,
    step_line,
    system_metrics,
)
from rlhf_dist.driver.recorder import Recorder
from rlhf_dist.driver.run_state import RestartBudget, RunState
from rlhf_dist.driver.scorer_group import ScorerGroup
from rlhf_dist.driver.sync_group import WeightSyncGroup
from rlhf_dist.driver.sync_loop import SyncLoop
from rlhf_dist.inputs import Inputs
from rlhf_dist.ledger import SampleLedger
from rlhf_dist.pools import PoolError, check_cluster_resources
from rlhf_dist.report import EVAL_SAMPLES_FILE
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
        self.ledger = SampleLedger(
            self.run_dir,
            len(inputs.prompts),
            samples,
            cfg.run.ledger,
            inputs.prompt_fields,
            updates=cfg.ppo.epochs,
        )
        self.state = RunState.initial(cfg, len(inputs.prompts))
        self.initial_state = self.state.state_dict()
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
        self.recorder = Recorder(
            cfg,
            self.state,
            self.tracker,
            self.ledger,
            self.elapsed,
            evaluate=self._evaluate,
            system=self._system,
            generators=lambda: len(self.generators),
        )
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
        self.generators.connect(WeightSyncGroup(cfg, self.learners))
        self.sync_weights(self.state.version)

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
        for part in (self.generators, self.generators.sync, self.scorers, self.learners):
            part.on_dispatch = hook

    def elapsed(self) -> float:
        """Seconds since this process started PPO (gold score against wall-clock time)."""
        return time.perf_counter() - self.t_started

    # ----------------------------------------------------------------- pool changes

    def sync_weights(self, version: int) -> float:
        """Push the learner's policy to every generator as ``version``."""
        return publish(self.generators, self.state, version)

    def autoscale(self, row: dict) -> bool:
        """Add one generator when generation took more than ``rollout.autoscale.generate_frac``
        of the step, below ``max_workers``, out of cooldown, and the cluster has room."""
        since = self.state.step - self.last_scale_step
        if not self.generators.wants_one_more(self.cfg.rollout.autoscale, row, since):
            return False
        self.last_scale_step = self.state.step  # a failed attempt waits out the cooldown too
        try:
            self.generators.add(1)
        except PoolError:  # the room was spread over nodes that cannot hold one more
            return False
        return True

    # ----------------------------------------------------------------- recording

    def record(self, out: StepOutcome) -> dict:
        """Book one step's outcome, from either loop (``Recorder.book``: the ledger, counters,
        the metrics row with the evaluation when due), then autoscale and checkpoint when
        due. Returns the row."""
        row = self.recorder.book(out)
        if out.skipped:
            return row
        self.autoscale(row)
        every, step = self.cfg.checkpoint.every, self.state.step
        if every and (step % every == 0 or step == self.cfg.run.steps):
            self.save_checkpoint()
        return row

    def _system(self) -> dict:
        pools = [self.learners.pool, self.generators.pool, *self.scorers.pools]
        return system_metrics({p.name: p for p in pools})

    def _evaluate(self, step: int) -> dict | None:
        """The evaluation's metrics when one is due at ``step``; a few of its samples are
        appended to ``eval_samples.jsonl`` (the run's summary shows the first and the last)."""
        if not self.evaluator.due(step):
            return None
        metrics = self.evaluator()
        with (self.run_dir / EVAL_SAMPLES_FILE).open("a", encoding="utf-8") as f:
            f.write(json.dumps({"step": step, "samples": self.evaluator.samples}) + "\n")
        return metrics

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
        """Continue from the newest usable checkpoint (``launch.py --resume``)."""
        return self._continue_from_newest(self.state.load_state_dict, "resumed", log)

    def _continue_from_newest(self, rewind, verb: str, log) -> Path | None:
        """Load the newest usable checkpoint into the learner group and ``rewind`` the run
        state to it (to the start without one); the generators receive its weights before
        they sample, and the metric and ledger rows written after it are set aside."""
        ckpt, saved, pending = checkpoints.load_newest(self.run_dir, self.learners, log)
        rewind(saved if ckpt else self.initial_state)
        self.ledger.rollback(self.state.step)
        dropped = self.tracker.rollback(self.state.step if ckpt else -1)  # -1: step 0's too
        self.sync_weights(self.state.version)
        self.last_checkpoint = ckpt
        self.loop = self._make_loop()  # it continues from the rewound state
        if pending:
            self.loop.load_pending(pending)
        s = self.state
        where = f"{ckpt} (step {s.step}, policy version {s.version})" if ckpt else "step 0"
        none = "" if ckpt else " (no usable checkpoint)"
        log(f"{verb} from {where}{none}; {dropped} metric rows after it set aside")
        return ckpt

    def _rebuild_learners(self, lost: LearnerLost, log) -> None:
        """A learner rank died: a new learner group (placed anew, on other nodes if need be)
        continues from the newest checkpoint, and the steps after it are redone."""
        try:
            self.budget.spend("a learner rank")
        except RestartsExhausted as e:
            raise TrainingError(f"{self._describe(lost)}; {e}; {self._checkpoint_hint()}") from lost
        self.state.counters.learner_restarts += 1
        log(f"{self._describe(lost)}: rebuilding the learner group")
        self.learners = self.groups[0] = self.learners.rebuilt(self.generators, self.inputs)
        self._continue_from_newest(self.state.rewind, "learner group rebuilt", log)

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

    def _describe(self, e: GroupError) -> str:
        """A group's error, with the step it happened at."""
        at = f"at step {self.state.step + 1}"
        if isinstance(e, LearnerLost):
            who = f"learner rank {e.rank}" if e.rank is not None else "a learner rank"
            return f"{who} died {at} ({e.cause or e.during})"
        if isinstance(e, WorkerFailedToStart):
            return f"a worker failed to start {at}: {e}"
        return str(e)

    @contextmanager
    def _failures(self, recover: bool = False):
        """A group's error ends the run naming the last checkpoint; so does a lost learner
        rank, unless ``recover``: then it is raised as ``LearnerLost`` for ``run`` to heal.
        The groups raise typed errors only (``driver/errors.py``); anything else is a bug of
        a role or of the driver, raised as it is."""
        try:
            yield
        except GroupError as e:
            if recover and isinstance(e, LearnerLost):
                raise
            raise TrainingError(f"{self._describe(e)}; {self._checkpoint_hint()}") from e

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
        if not self.cfg.checkpoint.every:
            log("checkpoint.every=0: a lost learner rank will restart PPO from step 0")
        while True:
            try:
                with self._failures(recover=True):
                    self._run_steps(history, bar, log)
                break
            except LearnerLost as lost:
                with self._failures():
                    self._rebuild_learners(lost, log)
                redone = self.state.step if self.last_checkpoint else -1  # rows after it go
                history[:] = [r for r in history if r["step"] <= redone]
                bar.n = self.state.step
        bar.close()
        return history

    def _run_steps(self, history: list, bar, log) -> None:
        """The evaluation before PPO, then each step recorded and printed."""
        if self.evaluator.gold and self.state.step == 0:
            before = {"stage": "ppo", "step": 0, **self._evaluate(0), K.ELAPSED: self.elapsed()}
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
