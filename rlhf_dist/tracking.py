"""Where metrics go: ``metrics.jsonl`` always, wandb when enabled, under the same keys.

wandb runs offline unless the user is logged in (``WANDB_API_KEY`` or a netrc entry), so a
job never blocks on the network; ``wandb.enabled=false`` never imports wandb at all. The wandb
run id is kept in the run directory, so a later stage or a resumed run in the same directory
continues the same wandb run.
"""

from __future__ import annotations

import json
import math
import netrc
import os
import secrets
from pathlib import Path

from rlhf_dist import metric_keys as K
from rlhf_dist.config import Config, to_dict

METRICS_FILE = "metrics.jsonl"
WANDB_ID_FILE = "wandb_run_id"


def logged_in_to_wandb() -> bool:
    """A key is configured locally (no network call)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


def wandb_mode(cfg: Config) -> str:
    if cfg.wandb.mode != "auto":
        return cfg.wandb.mode
    return os.environ.get("WANDB_MODE") or ("online" if logged_in_to_wandb() else "offline")


def set_aside_rows(path: Path, aside: Path, later) -> int:
    """Move the JSON lines of ``path`` for which ``later(row)`` holds (and lines cut short by a
    kill) to the end of ``aside``; the rest stay, replaced atomically. Returns how many moved."""
    if not path.exists():
        return 0
    kept, dropped = [], []
    for line in path.read_text().splitlines(keepends=True):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by the kill
            dropped.append(line if line.endswith("\n") else line + "\n")
            continue
        (dropped if later(row) else kept).append(line)
    if dropped:
        with aside.open("a") as f:
            f.writelines(dropped)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(kept))
        os.replace(tmp, path)
    return len(dropped)


class Tracker:
    def __init__(self, cfg: Config, run_dir: str | Path):
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.file = (self.run_dir / METRICS_FILE).open("a")
        self.wandb_run = None
        if cfg.wandb.enabled:
            self._start_wandb()

    def _start_wandb(self) -> None:
        import wandb

        id_file = self.run_dir / WANDB_ID_FILE
        run_id = id_file.read_text().strip() if id_file.exists() else secrets.token_hex(4)
        w = self.cfg.wandb
        self.wandb_run = wandb.init(
            project=w.project,
            entity=w.entity or None,
            name=w.name or self.run_dir.name,
            group=w.group or None,
            tags=[t.strip() for t in w.tags.split(",") if t.strip()] or None,
            config=to_dict(self.cfg),
            dir=str(self.run_dir),
            id=run_id,
            resume="allow",
            mode=wandb_mode(self.cfg),
            settings=wandb.Settings(console="off"),
        )
        id_file.write_text(run_id)
        # x axis of each namespace in wandb: PPO metrics against the PPO step, SFT/RM against
        # theirs
        for stage in K.SUPERVISED_STAGES:
            self.wandb_run.define_metric(K.stage_key(stage, "step"))
            self.wandb_run.define_metric(f"{stage}/*", step_metric=K.stage_key(stage, "step"))
        self.wandb_run.define_metric("step")
        for ns in K.PPO_NAMESPACES:
            self.wandb_run.define_metric(f"{ns}/*", step_metric="step")

    def log(self, row: dict) -> None:
        """One step's metrics; rows of the SFT/RM stages carry ``stage`` and their own step."""
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        if self.wandb_run is not None:
            stage = row.get("stage", "ppo")
            data = {k: v for k, v in row.items() if k != "stage" and _loggable(v)}
            if stage != "ppo":
                data[K.stage_key(stage, "step")] = data.pop("step")
            self.wandb_run.log(data)

    def rollback(self, step: int) -> int:
        """Drop the PPO rows after ``step`` (written after the checkpoint a run resumes from)
        from ``metrics.jsonl``, keeping them in ``metrics.rolled_back.jsonl``; returns how many."""
        self.file.close()
        path = self.run_dir / METRICS_FILE
        dropped = set_aside_rows(
            path,
            self.run_dir / "metrics.rolled_back.jsonl",
            lambda row: row.get("stage", "ppo") == "ppo" and row.get("step", 0) > step,
        )
        self.file = path.open("a")
        return dropped

    def samples(self, step: int, prompts, responses, scores) -> None:
        """A table of sample prompts, responses and rewards (wandb only)."""
        if self.wandb_run is None:
            return
        import wandb

        table = wandb.Table(columns=["step", "prompt", "response", "reward"])
        for p, r, s in zip(prompts, responses, scores):
            table.add_data(step, p, r, float(s))
        self.wandb_run.log({K.SAMPLES_TABLE: table, "step": step})

    def close(self) -> None:
        self.file.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()
            self.wandb_run = None


def _loggable(v) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
