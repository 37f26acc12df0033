"""configs/arith.yaml end to end, shortened: SFT on builtin:arith, then PPO against the rule
reward, through ``launch.py`` on a real local Ray cluster with real DeepSpeed. The reward
function checks that every sample received its own row's ``answer`` (training and evaluation
alike), and the held-out accuracy is logged as eval/gold_score."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
STEPS, PROMPTS, SAMPLES, EVAL_PROMPTS = 3, 16, 4, 64


@pytest.fixture(scope="module")
def arith_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("arith")
    checked = d / "checked"
    checked.mkdir()
    env = dict(
        os.environ, PYTHONPATH=str(ROOT / "tests" / "helpers"), CHECKED_ARITH_DIR=str(checked)
    )
    p = subprocess.run(
        [
            sys.executable,
            str(ROOT / "launch.py"),
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
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
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
