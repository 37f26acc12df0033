"""configs/arith.yaml end to end, shortened: SFT on builtin:arith, then PPO against the rule
reward, through ``launch.py`` on a real local Ray cluster with real DeepSpeed. The reward
function checks that every sample received its own row's ``answer`` (training and evaluation
alike), and the held-out accuracy is logged as eval/gold_score."""

import json
import math
import os
import subprocess
import sys
from collections import Counter, defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
STEPS, PROMPTS, SAMPLES, EVAL_PROMPTS = 3, 16, 4, 64


def launch(args: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "launch.py"), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.fixture(scope="module")
def arith_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("arith")
    checked = d / "checked"
    checked.mkdir()
    env = dict(
        os.environ, PYTHONPATH=str(ROOT / "tests" / "helpers"), CHECKED_ARITH_DIR=str(checked)
    )
    p = launch(
        [
            "--config",
            "configs/arith.yaml",
            f"run.dir={d / 'run'}",
            f"model.assets_dir={d / 'assets'}",
            "wandb.enabled=false",
            "sft.epochs=2",
            f"run.steps={STEPS}",
            f"eval.every={STEPS}",
            f"eval.num_prompts={EVAL_PROMPTS}",
            f"rollout.prompts_per_step={PROMPTS}",
            "reward.function=checked_arith:reward,rlhf_dist.tasks.arith:format_reward",
            "reward.weights=[1.0, 0.0]",  # the format is logged, not rewarded
            "eval.gold=checked_arith:reward",
        ],
        env,
    )
    assert p.returncode == 0, p.stderr[-4000:]
    rows = [json.loads(x) for x in (d / "run" / "metrics.jsonl").read_text().splitlines()]
    return d / "run", rows, p.stdout, checked


def test_stage_all_runs_sft_then_ppo_without_a_reward_model(arith_run):
    run_dir, rows, stdout, _ = arith_run
    assert {r["stage"] for r in rows} == {"sft", "ppo"}
    assert not (run_dir / "rm").exists()
    assert (run_dir / "sft" / "policy" / "model.safetensors").is_file()
    assert (run_dir / "ppo" / "policy" / "model.safetensors").is_file()
    assert "reward model" not in stdout


def test_held_out_accuracy_is_the_gold_score_and_the_proxy(arith_run):
    _, rows, stdout, _ = arith_run
    evals = [r for r in rows if r["stage"] == "ppo" and "eval/gold_score" in r]
    assert [r["step"] for r in evals] == [0, STEPS]
    for r in evals:
        assert r["eval/num_prompts"] == EVAL_PROMPTS
        # an accuracy: a whole number of right answers out of 64
        assert 0 < r["eval/gold_score"] < 1
        assert r["eval/gold_score"] * EVAL_PROMPTS == pytest.approx(
            round(r["eval/gold_score"] * EVAL_PROMPTS)
        )
        # the proxy is the same rule on the same samples (the format part weighs 0): it got
        # each held-out row's answer
        assert r["eval/proxy_reward"] == pytest.approx(r["eval/gold_score"], abs=1e-6)
    assert "gold score on held-out prompts:" in stdout


def test_every_scored_sample_received_its_own_rows_answer(arith_run):
    _, rows, _, checked = arith_run
    counted = sum(int(f.read_text()) for f in checked.iterdir())
    trained = STEPS * PROMPTS * SAMPLES
    # PPO's samples (reward scorers), the held-out samples twice per evaluation (proxy in the
    # reward scorers, gold in the driver); the checking function raises on a wrong answer
    assert counted == trained + 2 * 2 * EVAL_PROMPTS
    steps = [r for r in rows if r["stage"] == "ppo" and r["step"] > 0]
    assert [r["step"] for r in steps] == list(range(1, STEPS + 1))
    for r in steps:
        # each function's mean is logged; the reward is their weighted sum (1.0, 0.0)
        assert 0 <= r["rollout/reward_reward"] <= 1 and 0 <= r["rollout/reward_format_reward"] <= 1
        assert r["rollout/reward_mean"] == pytest.approx(r["rollout/reward_reward"], abs=1e-6)
    assert any(r["rollout/reward_format_reward"] > r["rollout/reward_reward"] for r in steps)


# ----------------------------------------------------------------------------- GRPO

GRPO_STEPS, GRPO_PROMPTS, GRPO_EVAL = 30, 32, 256


@pytest.fixture(scope="module")
def grpo_run(arith_run, tmp_path_factory):
    """configs/grpo.yaml's PPO stage with DAPO's dynamic sampling, from the SFT policy the
    recipe run above trained (shared: no second SFT)."""
    d = tmp_path_factory.mktemp("grpo")
    p = launch(
        [
            "--config",
            "configs/grpo.yaml",
            f"run.dir={d / 'run'}",
            "run.stage=ppo",
            f"model.policy={arith_run[0] / 'sft' / 'policy'}",
            "wandb.enabled=false",
            f"run.steps={GRPO_STEPS}",
            f"eval.every={GRPO_STEPS}",
            f"eval.num_prompts={GRPO_EVAL}",
            f"checkpoint.every={GRPO_STEPS}",
            "rollout.drop_uniform_groups=true",
            "learner.lr=1e-3",
        ]
    )
    assert p.returncode == 0, p.stderr[-4000:]
    rows = [json.loads(x) for x in (d / "run" / "metrics.jsonl").read_text().splitlines()]
    return d / "run", rows


def test_grpo_raises_held_out_accuracy_without_a_critic(grpo_run):
    run_dir, rows = grpo_run
    evals = [r for r in rows if "eval/gold_score" in r]
    assert [r["step"] for r in evals] == [0, GRPO_STEPS]
    (before, after) = (r["eval/gold_score"] for r in evals)
    se = math.sqrt((before * (1 - before) + after * (1 - after)) / GRPO_EVAL)
    assert after - before > 2.5 * se, (before, after, se)
    # no value model: no value metrics, and the checkpoint holds the policy's engine alone
    steps = [r for r in rows if r["step"] > 0]
    assert not any(k.startswith("train/value") or "critic" in k for r in steps for k in r)
    ckpt = run_dir / "checkpoints" / f"step-{GRPO_STEPS:08d}"
    assert json.loads((ckpt / "state.json").read_text())["engines"] == ["policy"]
    assert sorted(x.name for x in ckpt.iterdir()) == ["policy", "state.json"]


def test_dynamic_sampling_trains_full_steps_of_whole_groups_whose_rewards_differ(grpo_run):
    run_dir, rows = grpo_run
    steps = [r for r in rows if r["step"] > 0]
    assert sum(r["rollout/dropped_groups"] for r in steps) > 0
    assert any(r["rollout/fill_rounds"] >= 1 for r in steps)
    last = steps[-1]
    assert last["data/prompts_trained"] == GRPO_STEPS * GRPO_PROMPTS
    groups: dict = defaultdict(list)  # (step, epoch, row, why) -> its samples
    for s in (json.loads(x) for x in (run_dir / "samples.jsonl").read_text().splitlines()):
        groups[(s["step"], s["epoch"], s["row"], s.get("dropped", ""))].append(s)
    whys = Counter(why for (_, _, _, why) in groups)
    assert set(whys) <= {"", "uniform_group", "surplus"} and whys["uniform_group"] > 0
    assert whys[""] == GRPO_STEPS * GRPO_PROMPTS  # every step full
    # every prompt taken is accounted for once: trained, uniform or surplus
    assert last["data/prompts_consumed"] == sum(whys.values())
    for (_, _, _, why), samples in groups.items():
        # whole groups: every sample index once, all from one chunk
        assert sorted(s["sample"] for s in samples) == [0, 1, 2, 3]
        assert len({(s["chunk"], s["seed"]) for s in samples}) == 1
        rewards = {s["reward"] for s in samples}
        assert (len(rewards) == 1) == (why == "uniform_group")
    p = subprocess.run(
        [sys.executable, "-m", "rlhf_dist.report", str(run_dir), "--samples"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert p.returncode == 0, p.stdout + p.stderr
    assert "set aside by dynamic sampling" in p.stdout
