"""Asynchronous mode on a real local Ray cluster: bounded staleness, the queue bound, exact
equivalence with synchronous mode at max_staleness=0, samples that arrive too stale dropped and
sampled again, and a generator lost mid-run."""

import sys
from pathlib import Path

import pytest
import ray

from rlhf_dist.config import load_config

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "helpers"))
from compare_runs import assert_same_runs, metric_rows  # noqa: E402
from ppo_runs import run_checked  # noqa: E402

STEPS = 4
PROMPTS = 8
# keys only async rows have: the queue, and decoupled PPO's importance weights
ASYNC_ONLY = {
    "async/dropped_stale",
    "async/queue_samples",
    "async/queue_max",
    "train/is_weight_mean",
    "train/is_truncated_frac",
}


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


@pytest.fixture(scope="module")
def async0_run(ray_cluster, tiny_assets, tmp_path_factory):
    """The run directory of an undisturbed async run at max_staleness=0."""
    run_dir = tmp_path_factory.mktemp("async0")
    rows = run_checked(make_cfg(tiny_assets, "mode=async", "async.max_staleness=0"), run_dir)
    assert [r["sync/staleness_max"] for r in rows] == [0] * STEPS
    assert [r["async/dropped_stale"] for r in rows] == [0] * STEPS
    return run_dir


def test_async_with_zero_staleness_learns_exactly_like_sync(
    ray_cluster, tiny_assets, tmp_path, async0_run
):
    # The learner's threads as in async mode (its reservation: one): a thread count changes
    # the learner's float sums, and this compares the final weights to 1e-6.
    sync = run_checked(make_cfg(tiny_assets, "ray.block_cores=1"), tmp_path / "sync")
    # Every metric of every step and the final weights, but for the keys async mode alone has
    # and the prompts taken: the async cursor takes the next step's prompts before this step is
    # recorded (at most one step ahead at staleness 0), the sync cursor does not.
    ignore = ASYNC_ONLY | {"data/prompts_consumed"}
    assert_same_runs(async0_run, tmp_path / "sync", ignore=ignore)
    assert all(r["data/prompts_consumed"] == r["data/prompts_trained"] for r in sync)
    async0 = metric_rows(async0_run)
    ahead = [r["data/prompts_consumed"] - r["data/prompts_trained"] for r in async0]
    assert all(0 <= n <= PROMPTS for n in ahead) and ahead[-1] == 0, ahead
    # no token was stale, so no importance weight differed from 1
    assert [(r["train/is_weight_mean"], r["train/is_truncated_frac"]) for r in async0] == [
        (1.0, 0.0)
    ] * STEPS


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


def test_queue_bound_below_the_staleness_bound_holds(ray_cluster, tiny_assets, tmp_path):
    # max_staleness=2 would let generation run two steps ahead of the learner (three steps'
    # samples queued); a queue of one step and a half is the tighter bound, and must hold.
    bound = PROMPTS + PROMPTS // 2
    cfg = make_cfg(
        tiny_assets, "mode=async", "async.max_staleness=2", f"async.queue_samples={bound}"
    )
    rows = run_checked(cfg, tmp_path / "run")
    assert [r["async/queue_max"] <= bound for r in rows] == [True] * STEPS
    assert all(r["sync/staleness_max"] <= 2 for r in rows)
    # The bound was reached, not merely respected: once step 1's four chunks (8 samples) were
    # out, step 2's first two (4 samples) went to the generators before step 1 was trained,
    # whatever the timing, so they were sampled by version 0 and trained by version 1.
    assert max(r["async/queue_max"] for r in rows) == bound
    assert rows[1]["sync/staleness_max"] == 1
    assert rows[-1]["async/dropped_stale"] == 0


def roll_back_one_chunk(orch):
    """An ``on_dispatch`` hook that makes exactly one chunk arrive too stale: once the
    generator handed step 2's first chunk has sampled it, its ``version`` is set one back, and
    set forward again once it has sampled its next chunk (a Ray actor runs one call at a time,
    in the order they were sent). That next chunk is sampled by the current weights but tagged
    one version older, which max_staleness=0 does not allow, so it must be dropped and its
    prompts sampled again; the resampled chunk is then the very chunk an undisturbed run
    trains (same seed, same weights)."""
    dispatched, lowered = [], []
    chunks_per_step = PROMPTS // 2

    def shift(by):
        return lambda gen: setattr(gen, "version", gen.version + by)

    def hook(name, slot, task):
        if name != "rollout":
            return
        dispatched.append(slot)
        actor = orch.generators.actors[slot]
        if len(dispatched) == chunks_per_step + 1:  # step 2's first chunk (at staleness 0)
            ray.get(actor.__ray_call__.remote(shift(-1)))  # runs once that chunk is sampled
            lowered.append(slot)
        elif lowered == [slot]:  # that generator's next chunk: sampled tagged one back
            ray.get(actor.__ray_call__.remote(shift(+1)))
            lowered.append("restored")

    return hook


def test_chunk_arriving_too_stale_is_dropped_counted_and_sampled_again(
    ray_cluster, tiny_assets, tmp_path, async0_run
):
    cfg = make_cfg(tiny_assets, "mode=async", "async.max_staleness=0")
    # run_checked: every prompt taken was trained exactly once, every generator holds the
    # final weights
    rows = run_checked(cfg, tmp_path / "run", roll_back_one_chunk)
    assert [r["async/dropped_stale"] for r in rows] == [0, 2, 2, 2]  # one chunk: 2 samples
    assert [r["sync/staleness_max"] for r in rows] == [0] * STEPS  # none of them trained
    # the dropped prompts were sampled again and trained once: the run learned exactly what
    # the undisturbed run learned (every metric of every step, and the final weights)
    assert_same_runs(tmp_path / "run", async0_run, ignore={"async/dropped_stale"})


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
