"""Monitoring: wandb (offline) receives exactly what metrics.jsonl holds, PPO diagnostics are
there, sample tables are logged, and a later run in the same directory continues the wandb run."""

import json
import math
import sys
from pathlib import Path

import pytest

from rlhf_dist.config import load_config
from rlhf_dist.orchestrator import Orchestrator
from rlhf_dist.preflight import resolve_inputs
from rlhf_dist.tracking import WANDB_ID_FILE, Tracker

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "helpers"))
from wandb_records import history, run_file  # noqa: E402

DIAGNOSTICS = [
    "train/ratio_mean",
    "train/ratio_max",
    "train/value_clipfrac",
    "train/explained_variance",
    "train/advantages_mean",
    "train/advantages_std",
    "train/returns_mean",
    "train/kl_coef",
    "train/lr",
    "train/critic_lr",
    "rollout/score_std",
    "rollout/truncated_frac",
    "pool/num_generators",
    "pool/learner_rss_mb",
    "pool/rollout_rss_mb",
    "pool/reward_cpu_percent",
]


def test_wandb_offline_matches_metrics_jsonl(ray_cluster, tiny_assets, tmp_path):
    cfg = load_config(
        "configs/smoke.yaml",
        [
            f"model.assets_dir={tiny_assets.parent}",
            "run.steps=3",
            "learner.num_workers=1",
            "wandb.mode=offline",
            "wandb.table_every=2",
            "wandb.table_rows=4",
        ],
    )
    run_dir = tmp_path / "run"
    orch = Orchestrator(cfg, resolve_inputs(cfg), run_dir)
    try:
        orch.run(log=lambda _: None)
    finally:
        orch.shutdown()

    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    logged = history(run_file(run_dir))
    by_step = {r["step"]: r for r in logged if "rollout/reward_mean" in r}
    assert sorted(by_step) == [1, 2, 3]
    for row in rows:
        for key in DIAGNOSTICS:
            assert key in row and math.isfinite(row[key]), key
        w = by_step[row["step"]]
        for key, value in row.items():
            if key == "stage":
                continue
            assert w[key] == pytest.approx(value, rel=1e-6, abs=1e-9), key
    # a logged wandb.Table appears in the history as a reference to the table's file
    tables = [r for r in logged if r.get("rollout/samples/_type") == "table-file"]
    assert [t["step"] for t in tables] == [2]
    assert tables[0]["rollout/samples/nrows"] == 4
    assert (run_dir / WANDB_ID_FILE).read_text().strip() in run_file(run_dir).name


def test_second_run_in_same_directory_continues_the_wandb_run(tmp_path):
    cfg = load_config(None, ["wandb.mode=offline"])
    for step in (1, 2):
        t = Tracker(cfg, tmp_path)
        t.log({"stage": "sft", "step": step, "sft/loss": 1.0 / step})
        t.close()
    run_id = (tmp_path / WANDB_ID_FILE).read_text().strip()
    files = sorted(tmp_path.glob("wandb/*run-*/run-*.wandb"))
    assert len(files) == 2 and all(f.name == f"run-{run_id}.wandb" for f in files)
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    # SFT rows go to wandb against their own step axis
    assert history(files[-1])[-1]["sft/step"] == 2
