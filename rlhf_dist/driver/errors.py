"""The errors a worker group raises, and the one the top level turns them into.

A group says what went wrong with its own workers; only the top level (``Orchestrator.run``)
knows the run directory and the last checkpoint, so only it adds where to continue from
(docs/architecture.md, "Failures").
"""

from __future__ import annotations


class GroupError(RuntimeError):
    """A worker group cannot go on; the message says which worker and why."""


class RestartsExhausted(GroupError):
    """A worker was lost and ``run.max_restarts`` replacements are used up."""


class WorkerUnplaceable(GroupError):
    """A lost worker's replacement cannot be placed on the cluster."""


class SyncStalled(GroupError):
    """A generator was lost during a weight sync and the learner's send never ended."""


class LearnerLost(GroupError):
    """A learner rank died (process killed, node lost): the top level rebuilds the learner
    group from the newest checkpoint (docs/architecture.md, "Failures"). ``rank``: which one
    (None when it could not be told), ``cause``: the Ray error that showed it, ``during``:
    what the group was doing."""

    def __init__(self, rank: int | None, cause: str = "", during: str = ""):
        self.rank, self.cause, self.during = rank, cause, during
        who = f"learner rank {rank}" if rank is not None else "a learner rank"
        super().__init__(f"{who} died" + (f" during {during}" if during else ""))


class WorkerFailedToStart(GroupError):
    """An actor's constructor raised: a replacement would fail the same way, so the run stops
    with the worker's own error (the message holds it)."""


class NonFiniteSteps(GroupError):
    """``run.max_bad_steps`` PPO steps in a row had non-finite numbers."""


class NoSignal(GroupError):
    """``rollout.drop_uniform_groups`` found too few prompts whose samples' rewards differ
    within ``rollout.max_fill_rounds`` rounds of sampling."""


class WeightSyncError(RuntimeError):
    """A generator does not hold what the learner sent."""


class TrainingError(RuntimeError):
    """The run cannot go on; the message says why and names the last checkpoint."""
