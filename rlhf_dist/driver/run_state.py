"""The run's state: everything a checkpoint holds besides the learner's engines.

One dataclass, read and written in one place (``state_dict`` / ``load_state_dict``), so a
new counter is added once. The keys are those of ``state.json`` (``rlhf_dist.checkpoint``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from rlhf_dist.algo import AdaptiveKLController, FixedKLController
from rlhf_dist.config import Config
from rlhf_dist.data import PromptCursor
from rlhf_dist.driver.errors import RestartsExhausted

FAULT_COUNTERS = ("restarts", "learner_restarts", "redone_chunks")


@dataclass
class Counters:
    """Run totals, logged each step and carried across a resume."""

    skipped_steps: int = 0  # PPO steps skipped for non-finite numbers
    bad_streak: int = 0  # of them, in a row up to now
    restarts: int = 0  # lost workers replaced (learner ranks included)
    learner_restarts: int = 0  # learner groups rebuilt from a checkpoint after a lost rank
    redone_chunks: int = 0  # chunks of work resubmitted after a loss
    prompts_consumed: int = 0  # taken from the cursor by PPO steps
    prompts_trained: int = 0  # in batches the learner trained on


class RestartBudget:
    """The one restart budget every worker group spends from (``run.max_restarts``)."""

    def __init__(self, counters: Counters, limit: int):
        self.counters, self.limit = counters, limit

    def spend(self, what: str) -> None:
        """Count one replacement of ``what``; raise once the budget is used up."""
        self.counters.restarts += 1
        if self.counters.restarts > self.limit:
            raise RestartsExhausted(
                f"{what} was lost and run.max_restarts={self.limit} replacements are used up"
            )

    def redone(self, n: int) -> None:
        """Count ``n`` chunks of work resubmitted after their worker was lost."""
        self.counters.redone_chunks += n


@dataclass
class RunState:
    cursor: PromptCursor
    kl_ctl: AdaptiveKLController | FixedKLController
    step: int = 0  # PPO steps done
    version: int = 0  # the learner's policy version (one more per update)
    counters: Counters = field(default_factory=Counters)

    @classmethod
    def initial(cls, cfg: Config, num_prompts: int) -> RunState:
        p = cfg.ppo
        kl = (
            AdaptiveKLController(p.kl_coef, p.kl_target, p.kl_horizon)
            if p.adaptive_kl
            else FixedKLController(p.kl_coef)
        )
        return cls(PromptCursor(num_prompts, cfg.run.seed, cfg.data.shuffle), kl)

    def take_prompts(self, n: int) -> list[int]:
        ids = self.cursor.take(n)
        self.counters.prompts_consumed += len(ids)
        return ids

    def data_position(self) -> dict:
        """The cursor and prompts consumed as they stand (what a step's outcome carries)."""
        return {
            "cursor": self.cursor.state_dict(),
            "prompts_consumed": self.counters.prompts_consumed,
        }

    def state_dict(self) -> dict:
        return {
            "step": self.step,
            "version": self.version,
            "cursor": self.cursor.state_dict(),
            "kl_controller": self.kl_ctl.state_dict(),
            **dataclasses.asdict(self.counters),
        }

    def rewind(self, state: dict) -> None:
        """Go back to ``state`` (a checkpoint's, or the initial one) in-job: what a rebuilt
        learner group redoes is rewound; the fault counters keep counting what happened."""
        faults = {k: getattr(self.counters, k) for k in FAULT_COUNTERS}
        self.load_state_dict(state)
        for k, v in faults.items():
            setattr(self.counters, k, v)

    def load_state_dict(self, state: dict) -> None:
        self.step, self.version = state["step"], state["version"]
        self.cursor.load_state_dict(state["cursor"])
        self.kl_ctl.load_state_dict(state["kl_controller"])
        for f in dataclasses.fields(Counters):  # in place: the restart budget holds them
            setattr(self.counters, f.name, state.get(f.name, 0))
