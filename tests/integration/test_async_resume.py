"""Async checkpoints lose nothing: a run stopped right after a step (chunks of the next steps
sampled or in flight, as at a kill) and resumed from its last checkpoint trains every prompt
of each epoch exactly ``samples_per_prompt`` times (the sample ledger proves it), and at
``async.max_staleness=0`` writes the same metrics as a run never stopped.

The stop is deterministic: the test drives the loop itself and abandons it after step 3 with
the checkpoint of step 2 the newest, so the samples of steps 3-4 that were generated and not
yet trained at the checkpoint live only in the checkpoint's pending samples. (A driver killed
with SIGKILL leaves exactly this on disk; tests/integration/test_resume.py kills one.)"""

import json
import shutil
import sys
from collections import Counter
from pathlib import Path

import pytest

from rlhf_dist.config import load_config
from rlhf_dist.driver.checkpoints import PENDING_FILE
from rlhf_dist.ledger import epoch_coverage, read_ledger
from rlhf_dist.orchestrator import Orchestrator
from rlhf_dist.preflight import resolve_inputs

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "helpers"))
from pinned_runs import pinned  # noqa: E402
from ppo_runs import assert_taken_equals_trained  # noqa: E402

STEPS, PROMPTS, NUM_PROMPTS, SAMPLES = 6, 4, 6, 2  # 24 prompts: four epochs of six


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "prompts.jsonl"
    words = ["red", "blue", "green", "small", "big", "round"]
    path.write_text("".join(json.dumps({"prompt": f"the {w}"}) + "\n" for w in words))
    return path


def make_cfg(tiny_assets, prompts_file, run_dir, staleness):
    return load_config(
        None,
        [
            f"model.assets_dir={tiny_assets.parent}",
            f"data.prompts={prompts_file}",
            f"run.dir={run_dir}",
            f"run.steps={STEPS}",
            "mode=async",
            f"async.max_staleness={staleness}",
            "rollout.num_workers=2",
            f"rollout.prompts_per_step={PROMPTS}",
            f"rollout.samples_per_prompt={SAMPLES}",
            "rollout.chunk_prompts=1",
            "rollout.max_new_tokens=6",
            "learner.lr=1e-3",
            "ppo.minibatch_size=8",
            "ppo.micro_batch_size=4",
            "checkpoint.every=1",
            "checkpoint.keep=3",  # several on disk: an older one's engines would show
            # every piece of run state that can change moves: the KL coefficient adapts
            "ppo.adaptive_kl=true",
            "ppo.kl_target=0.001",
            "ppo.kl_horizon=100",
            "wandb.enabled=false",
        ],
    )


def run_straight(cfg) -> list[dict]:
    orch = Orchestrator(cfg, resolve_inputs(cfg), cfg.run.dir)
    try:
        orch.run(log=lambda _: None)
    finally:
        orch.shutdown()
    return rows(cfg.run.dir)


def run_stopped_and_resumed(cfg) -> list[dict]:
    orch = Orchestrator(cfg, resolve_inputs(cfg), cfg.run.dir)
    try:
        for out in orch.loop.steps():
            orch.record(out)
            if orch.state.step == 3:
                break  # abandoned with the next steps' chunks sampled or in flight
    finally:
        orch.shutdown()
    # killed before step 3's checkpoint committed: steps 1 and 2's are on disk
    shutil.rmtree(Path(cfg.run.dir) / "checkpoints" / "step-00000003")
    ckpt = Path(cfg.run.dir) / "checkpoints" / "step-00000002"
    assert sorted(p.name for p in ckpt.parent.iterdir()) == ["step-00000001", ckpt.name]
    assert (ckpt / PENDING_FILE).exists()
    orch = Orchestrator(cfg, resolve_inputs(cfg), cfg.run.dir)
    try:
        assert orch.restore(log=lambda _: None) == ckpt
        assert orch.state.step == 2
        orch.run(log=lambda _: None)
    finally:
        orch.shutdown()
    return rows(cfg.run.dir)


def rows(run_dir) -> list[dict]:
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return [json.loads(x) for x in lines]


def assert_each_sample_slot_trained_once(run_dir, cfg):
    ledger = read_ledger(run_dir)
    assert sorted(Counter(r["step"] for r in ledger).items()) == [
        (s, PROMPTS * SAMPLES) for s in range(1, STEPS + 1)
    ]
    for epoch in range(STEPS * PROMPTS // NUM_PROMPTS):
        cov = epoch_coverage(ledger, epoch, NUM_PROMPTS, SAMPLES)
        assert cov["exact"], (epoch, cov)
    assert_taken_equals_trained(run_dir, cfg, NUM_PROMPTS)
    # step 3's first training (before the stop) was set aside, not counted twice
    aside = (Path(run_dir) / "samples.rolled_back.jsonl").read_text().splitlines()
    assert {json.loads(x)["step"] for x in aside} == {3}


def test_resumed_async_run_at_staleness_0_matches_the_straight_run(
    ray_cluster, tiny_assets, prompts_file, tmp_path
):
    straight = run_straight(make_cfg(tiny_assets, prompts_file, tmp_path / "a", 0))
    cfg = make_cfg(tiny_assets, prompts_file, tmp_path / "b", 0)
    resumed = run_stopped_and_resumed(cfg)
    assert [r["step"] for r in resumed] == list(range(1, STEPS + 1))
    for want, got in zip(straight, resumed, strict=True):
        w, g = pinned(want), pinned(got)
        assert sorted(w) == sorted(g)
        for key, value in w.items():
            assert g[key] == (
                pytest.approx(value, rel=1e-6, abs=1e-9) if isinstance(value, float) else value
            ), (w["step"], key)
    assert_each_sample_slot_trained_once(tmp_path / "b", cfg)


def test_resumed_async_run_at_staleness_1_trains_each_sample_slot_once(
    ray_cluster, tiny_assets, prompts_file, tmp_path
):
    cfg = make_cfg(tiny_assets, prompts_file, tmp_path / "run", 1)
    run_stopped_and_resumed(cfg)
    assert_each_sample_slot_trained_once(tmp_path / "run", cfg)
    # samples generated before the stop were trained after the resume, with the versions
    # that generated them: some trained sample is a version behind its learner
    assert max(r["staleness"] for r in read_ledger(tmp_path / "run")) == 1
