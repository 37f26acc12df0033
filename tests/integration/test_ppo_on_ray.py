"""The synchronous PPO loop on a real local Ray cluster with a real DeepSpeed learner group."""

import json
import math

import pytest
import ray

from rlhf_dist.config import load_config
from rlhf_dist.orchestrator import Orchestrator
from rlhf_dist.preflight import resolve_inputs

REQUIRED_KEYS = [
    "step",
    "rollout/reward_mean",
    "rollout/response_length_mean",
    "train/policy_loss",
    "train/value_loss",
    "train/kl",
    "train/approx_kl",
    "train/clipfrac",
    "train/entropy",
    "train/grad_norm",
    "time/generate",
    "time/score",
    "time/train",
    "time/weight_sync",
    "time/step",
    "perf/tokens_per_s",
    "sync/version",
]


def test_two_ppo_steps_zero2_world_size_2(ray_cluster, tiny_assets, tmp_path):
    cfg = load_config(
        None,
        [
            f"model.assets_dir={tiny_assets.parent}",
            "run.steps=2",
            "rollout.num_workers=2",
            "rollout.prompts_per_step=8",
            "rollout.max_new_tokens=8",
            "reward.num_workers=1",
            "reference.num_workers=1",
            "learner.num_workers=2",
            "learner.zero_stage=2",
            "learner.lr=1e-3",
            "ppo.minibatch_size=4",
            "ppo.micro_batch_size=2",
        ],
    )
    orch = Orchestrator(cfg, resolve_inputs(cfg), tmp_path / "run")
    try:
        before = ray.get(orch.learners.call("policy_checksum"))[0]
        assert [s["version"] for s in ray.get(orch.generators.call("status"))] == [0, 0]
        orch.run(log=lambda _: None)
        after = ray.get(orch.learners.call("policy_checksum"))[0]
        assert after != before, "the learner's policy did not change"
        status = ray.get(orch.generators.call("status"))
        assert [s["version"] for s in status] == [2, 2]
        assert [s["checksum"] for s in status] == [after, after]
    finally:
        orch.shutdown()

    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    assert [r["step"] for r in rows] == [1, 2]
    assert [r["sync/version"] for r in rows] == [1, 2]
    for r in rows:
        missing = [k for k in REQUIRED_KEYS if k not in r]
        assert not missing
        bad = {k: r[k] for k in REQUIRED_KEYS if not math.isfinite(r[k])}
        assert not bad
    assert rows[0]["train/optimizer_steps"] == 2  # 8 samples / minibatch 4, one epoch
    assert (tmp_path / "run" / "config.yaml").exists()
    assert load_config(tmp_path / "run" / "config.yaml") == cfg
    check_ledger_against_metrics(tmp_path / "run", rows, samples_per_step=8)


def check_ledger_against_metrics(run_dir, rows, samples_per_step):
    """samples.jsonl has one line per trained sample, agreeing with metrics.jsonl."""
    from rlhf_dist.ledger import read_ledger

    ledger = read_ledger(run_dir)
    for r in rows:
        lines = [x for x in ledger if x["step"] == r["step"]]
        assert len(lines) == samples_per_step, r["step"]
        mean = sum(x["reward"] for x in lines) / len(lines)
        assert mean == pytest.approx(r["rollout/reward_mean"], rel=1e-6)
        assert max(x["staleness"] for x in lines) == r["sync/staleness_max"]
        assert {x["version"] for x in lines} == {r["sync/version"] - 1}  # sampled by v-1
        length = sum(x["length"] for x in lines) / len(lines)
        assert length == pytest.approx(r["rollout/response_length_mean"], rel=1e-6)
    keys = [(x["epoch"], x["row"], x["sample"]) for x in ledger]
    assert len(set(keys)) == len(keys), "a sample slot was trained twice"
    assert {x["slot"] for x in ledger} <= {0, 1} and all(":" in x["worker"] for x in ledger)


def test_pool_that_cannot_fit_is_refused_naming_it(ray_cluster, tiny_assets, tmp_path):
    cfg = load_config(
        None,
        [f"model.assets_dir={tiny_assets.parent}", "rollout.num_workers=2", "rollout.num_gpus=1"],
    )
    from rlhf_dist.pools import PoolError

    with pytest.raises(PoolError, match=r"rollout: .*num_gpus=1.*cluster has 0 GPU"):
        Orchestrator(cfg, resolve_inputs(cfg), tmp_path / "run")
