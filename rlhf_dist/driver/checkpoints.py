"""Saving and restoring a PPO run: the learner group's engines plus the run state.

The files and the atomic commit are ``rlhf_dist.checkpoint``'s; this module decides what goes
in (every learner rank's engines, the policy as a HF directory when asked, ``RunState``) and
which checkpoint a resumed run continues from: the newest one that loads.
"""

from __future__ import annotations

from pathlib import Path

import ray

from rlhf_dist import checkpoint
from rlhf_dist.config import Config
from rlhf_dist.driver.learner_group import LearnerGroup
from rlhf_dist.driver.run_state import RunState


def save(cfg: Config, run_dir: Path, state: RunState, learners: LearnerGroup, tokenizer: str):
    """Every rank's engines and the run state, committed atomically; returns the directory."""
    tmp = checkpoint.begin(run_dir, state.step)
    learners.save(str(tmp))
    if cfg.checkpoint.save_hf:
        learners.export(str(tmp / "policy_hf"), tokenizer)
    return checkpoint.commit(tmp, state.state_dict(), cfg.checkpoint.keep)


def load_newest(run_dir: Path, state: RunState, learners: LearnerGroup, log) -> Path | None:
    """Load the newest usable checkpoint into the learner ranks and ``state`` (older ones are
    tried when it is not usable); None when there is none."""
    for ckpt in reversed(checkpoint.checkpoint_dirs(run_dir)):
        try:
            saved = checkpoint.read_state(ckpt)
            learners.load(str(ckpt), saved["version"])
        except (checkpoint.CheckpointError, ray.exceptions.RayTaskError) as e:
            cause = e.cause if isinstance(e, ray.exceptions.RayTaskError) else e
            log(f"checkpoint {ckpt.name} is unusable ({cause}); trying the one before")
            continue
        state.load_state_dict(saved)
        return ckpt
    return None
