"""Saving and restoring a PPO run: the learner group's engines plus the run state.

The files and the atomic commit are ``rlhf_dist.checkpoint``'s; this module decides what goes
in (every learner rank's engines, the policy as a HF directory when asked, ``RunState``) and
which checkpoint a resumed run continues from: the newest one that loads.
"""

from __future__ import annotations

from pathlib import Path

import ray
import torch

from rlhf_dist import checkpoint
from rlhf_dist.config import Config
from rlhf_dist.driver.learner_group import LearnerGroup
from rlhf_dist.driver.run_state import RunState

PENDING_FILE = "pending_samples.pt"  # async mode: samples generated, not yet trained


def save(
    cfg: Config,
    run_dir: Path,
    state: RunState,
    learners: LearnerGroup,
    tokenizer: str,
    pending: dict | None = None,
) -> Path:
    """Every rank's engines, the run state and the loop's pending work (async mode: the steps
    whose prompts the cursor has passed but the learner has not trained), committed
    atomically."""
    tmp = checkpoint.begin(run_dir, state.step)
    learners.save(str(tmp))
    if cfg.checkpoint.save_hf:
        learners.export(str(tmp / "policy_hf"), tokenizer)
    if pending is not None:
        torch.save(pending, tmp / PENDING_FILE)
    saved = {**state.state_dict(), "learner": checkpoint.learner_layout(cfg)}
    return checkpoint.commit(tmp, saved, cfg.checkpoint.keep)


def load_newest(run_dir: Path, learners: LearnerGroup, log) -> tuple[Path | None, dict, dict]:
    """Load the newest usable checkpoint into the learner ranks (older ones are tried when it
    is not usable); returns it, its run state and its pending work (empty: none). Engine states
    of a layout the learners cannot load (another ZeRO stage, or rank count at ZeRO 1-3) stop
    the resume with a ``ConfigError`` naming the key: falling back to an older checkpoint, or
    to step 0, would then overwrite the run's checkpoints."""
    for ckpt in reversed(checkpoint.checkpoint_dirs(run_dir)):
        try:
            saved = checkpoint.read_state(ckpt)
            if "learner" in saved:  # states the learners cannot load: stop, lose nothing
                checkpoint.check_layout(saved["learner"], learners.cfg, f"checkpoint {ckpt}")
            pending = _read_pending(ckpt)
            learners.load(str(ckpt), saved["version"])
        except (checkpoint.CheckpointError, ray.exceptions.RayTaskError) as e:
            cause = e.cause if isinstance(e, ray.exceptions.RayTaskError) else e
            log(f"checkpoint {ckpt.name} is unusable ({cause}); trying the one before")
            continue
        return ckpt, saved, pending or {}
    return None, {}, {}


def _read_pending(ckpt: Path) -> dict | None:
    """The pending work saved with the checkpoint (async mode), None when there is none."""
    path = ckpt / PENDING_FILE
    if not path.exists():
        return None
    try:
        return torch.load(path, weights_only=True)
    except Exception as e:  # a truncated or foreign file: this checkpoint cannot be resumed
        msg = f"checkpoint {ckpt}: {PENDING_FILE} is unreadable ({e})"
        raise checkpoint.CheckpointError(msg) from None
