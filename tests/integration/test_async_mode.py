"""Asynchronous mode on a real local Ray cluster: bounded staleness, the queue bound, exact
equivalence with synchronous mode at max_staleness=0, and a generator lost mid-run."""

import sys
from pathlib import Path

import pytest
import ray

from rlhf_dist.config import load_config

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "helpers"))
from ppo_runs import run_checked  # noqa: E402

STEPS = 4
PROMPTS = 8
COMPARED = ["rollout/reward_mean", "train/policy_loss", "train/value_loss", "train/kl"]


def make_cfg(tiny_assets, *extra):
    return load_config(
        None,
        [
            f"model.assets_dir={tiny_assets.parent}",
            f"run.steps={STEPS}",
            "rollout.num_workers=2",
            f"rollout.prompts_per_step={PROMPTS}",
            "rollout.chunk_prompts=2",
            "rollout.max_new_tokens=8",
            "learner.lr=1e-3",
            "ppo.minibatch_size=8",
            "ppo.micro_batch_size=4",
            "checkpoint.every=0",
            *extra,
        ],
    )


def test_async_with_zero_staleness_learns_exactly_like_sync(ray_cluster, tiny_assets, tmp_path):
    sync = run_checked(make_cfg(tiny_assets), tmp_path / "sync")
    async0 = run_checked(
        make_cfg(tiny_assets, "mode=async", "async.max_staleness=0"), tmp_path / "a0"
    )
    assert [r["sync/staleness_max"] for r in async0] == [0] * STEPS
    for got, want in zip(async0, sync):
        for key in COMPARED:
            assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-7), key


def test_async_overlaps_generation_within_staleness_and_queue_bounds(
    ray_cluster, tiny_assets, tmp_path
):
    cfg = make_cfg(tiny_assets, "mode=async", "async.max_staleness=1")
    rows = run_checked(cfg, tmp_path / "run")
    assert all(r["sync/staleness_max"] <= 1 for r in rows)
    # step 2's samples were drawn while step 1 trained: generation overlapped training
    assert rows[1]["sync/staleness_max"] == 1
    assert 0 < rows[1]["train/stale_token_frac"] <= 1
    assert rows[1]["train/is_weight_mean"] > 0
    assert all(r["async/queue_max"] <= 2 * PROMPTS for r in rows)  # two steps' worth
    assert [r["sync/version"] for r in rows] == [1, 2, 3, 4]
    assert rows[-1]["async/dropped_stale"] == 0  # the dispatch rule throttles instead


def test_async_generator_killed_loses_no_sample(ray_cluster, tiny_assets, tmp_path):
    def make(orch):
        dispatched = []

        def hook(name, slot, task):
            if name != "rollout":
                return
            dispatched.append(slot)
            if len(dispatched) == 6:  # a chunk of step 2, handed out while step 1 trains
                ray.kill(orch.generators.actors[slot])

        return hook

    cfg = make_cfg(tiny_assets, "mode=async", "async.max_staleness=1")
    rows = run_checked(cfg, tmp_path / "run", make)  # checks consumed == trained == every prompt
    assert rows[-1]["fault/restarts"] == 1
    assert rows[-1]["fault/redone_chunks"] >= 1
    assert all(r["sync/staleness_max"] <= 1 for r in rows)
