"""Multi-turn, tool-using rollouts on a real Ray cluster (``builtin:calc``, a GRPO learner):
sync and async mode train on trajectories whose tool outputs are context, not trained; the
ledger records each sample's turns and tool calls; a generator SIGKILLed inside a rollout has
its chunk re-run whole, and the run learns exactly what an undisturbed one does; a run resumed
from a checkpoint trains the next step as the straight run did.

The policy is the task's base model (no SFT: its turns are mostly invalid calls, which is what
these tests want: every guard and counter works on them too).
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import pytest
import ray

from rlhf_dist import metric_keys as K
from rlhf_dist.config import load_config
from rlhf_dist.ledger import read_ledger
from rlhf_dist.orchestrator import Orchestrator
from rlhf_dist.preflight import resolve_inputs

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "helpers"))
from compare_runs import assert_same_runs  # noqa: E402
from kill_points import KillPoint  # noqa: E402
from ppo_runs import run_checked  # noqa: E402

STEPS, PROMPTS, SAMPLES = 2, 4, 2


ROOT = Path(__file__).resolve().parents[2]


def make_cfg(assets, run_dir, *extra):
    """``configs/calc.yaml``'s GRPO stage, short, on the task's base model (no SFT)."""
    return load_config(
        ROOT / "configs/calc.yaml",
        [
            f"model.assets_dir={assets}",
            f"run.dir={run_dir}",
            "run.stage=ppo",
            "model.policy=builtin:calc",
            "eval.gold=",
            f"run.steps={STEPS}",
            "rollout.num_workers=2",
            f"rollout.prompts_per_step={PROMPTS}",
            f"rollout.samples_per_prompt={SAMPLES}",
            "rollout.chunk_prompts=1",
            "rollout.max_turns=3",
            "rollout.max_new_tokens=6",
            "rollout.max_total_tokens=40",
            "rollout.max_prompt_tokens=16",
            "ppo.minibatch_size=8",
            "ppo.micro_batch_size=4",
            "learner.lr=1e-3",
            "checkpoint.every=0",
            "wandb.enabled=false",
            *extra,
        ],
    )


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return tmp_path_factory.mktemp("calc_assets")


@pytest.fixture(scope="module")
def straight(ray_cluster, assets, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("straight")
    return run_checked(make_cfg(assets, run_dir), run_dir), run_dir


def test_a_multi_turn_run_trains_the_sampled_tokens_and_books_the_turns(straight):
    rows, run_dir = straight
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert 1 <= r[K.TURNS_MEAN] <= 3 and r[K.TOOL_CALLS_MEAN] > 0
        assert r[K.ENV_FAILURES] >= 0 and K.ENV_TIMEOUTS in r
        assert r[K.OPTIMIZER_STEPS] == 2  # configs/calc.yaml: 2 epochs of one minibatch
    ledger = read_ledger(run_dir)
    assert len(ledger) == STEPS * PROMPTS * SAMPLES
    assert all(1 <= x["turns"] <= 3 and x["ended"] for x in ledger)
    assert {x["ended"] for x in ledger} <= {"done", "max_turns", "invalid_calls", "token_cap"}
    # the response length counts sampled tokens only: observations are context
    assert all(x["length"] <= 3 * 6 for x in ledger)


def test_async_mode_rolls_out_trajectories_too(ray_cluster, assets, tmp_path):
    cfg = make_cfg(assets, tmp_path / "run", "mode=async", "async.max_staleness=1")
    rows = run_checked(cfg, tmp_path / "run")
    assert [r["step"] for r in rows] == [1, 2] and all(K.TURNS_MEAN in r for r in rows)


def test_a_generator_killed_inside_a_rollout_is_replaced_and_its_chunk_rerun_whole(
    ray_cluster, assets, straight, tmp_path
):
    """The generators' HF ``generate`` is trapped after step 1; at step 2's first chunk the
    driver waits until that chunk's second turn is held inside ``generate``, then SIGKILLs the
    generator: mid-trajectory. Chunk seeds make the re-run identical: the faulted run trains
    exactly what the straight run trained."""
    point = KillPoint(tmp_path / "sample")
    killed = []

    def make(orch):
        def hook(name, slot, task):
            if name == "weight_sync" and orch.step_idx == 1 and not point.actors:
                point.arm(orch.generators.actors, "model.generate", skip=1)
            elif name == "rollout" and orch.step_idx == 1 and point.actors and not killed:
                pid = point.caught(timeout_s=120)  # its first turn passed, the second is held
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)

        return hook

    run_dir = tmp_path / "run"
    rows = run_checked(make_cfg(assets, run_dir), run_dir, on_dispatch=make)
    assert killed and rows[-1][K.RESTARTS] == 1 and rows[-1][K.REDONE_CHUNKS] == 1
    assert_same_runs(run_dir, straight[1], ignore={K.RESTARTS, K.REDONE_CHUNKS, K.SYNC_BYTES})


def test_a_resumed_multi_turn_run_trains_the_next_step_as_the_straight_run(
    ray_cluster, assets, straight, tmp_path
):
    run_dir = tmp_path / "run"
    cfg = make_cfg(assets, run_dir, "checkpoint.every=1")
    orch = Orchestrator(cfg, resolve_inputs(cfg), run_dir)
    try:
        orch.step()
        orch.save_checkpoint()
    finally:
        orch.shutdown()
    orch = Orchestrator(cfg, resolve_inputs(cfg), run_dir)
    try:
        assert orch.restore(log=lambda _: None).name == "step-00000001"
        orch.run(log=lambda _: None)
        orch.export_policy(run_dir / "policy")
        learner = ray.get(orch.learners.call("policy_checksum"))[0]
        held = [s["checksum"] for s in ray.get(orch.generators.call("status"))]
        assert held == [learner] * 2
    finally:
        orch.shutdown()
    assert_same_runs(run_dir, straight[1])
