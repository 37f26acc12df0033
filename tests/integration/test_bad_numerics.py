"""Non-finite rewards: steps are skipped and counted; after run.max_bad_steps in a row the run
stops with a clear message naming the last checkpoint, which stays intact and loadable."""

import json
import os
import subprocess
import sys
from pathlib import Path

from rlhf_dist.checkpoint import checkpoint_dirs, read_state

ROOT = Path(__file__).resolve().parents[2]


def test_nan_rewards_skip_steps_then_stop_cleanly(tiny_assets, tmp_path):
    run = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=str(ROOT / "tests" / "helpers"))
    p = subprocess.run(
        [
            sys.executable,
            str(ROOT / "launch.py"),
            "--config",
            "configs/smoke.yaml",
            f"model.assets_dir={tiny_assets.parent}",
            f"run.dir={run}",
            "run.steps=8",
            "run.max_bad_steps=3",
            "checkpoint.every=2",
            "checkpoint.save_hf=true",
            "learner.num_workers=1",
            "wandb.enabled=false",
            "reward.function=faulty_reward:nan_after_16_responses",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert p.returncode == 1, p.stderr[-3000:]
    assert "3 consecutive PPO steps had non-finite scores" in p.stderr
    assert f"the last checkpoint is {run / 'checkpoints' / 'step-00000002'}" in p.stderr
    assert "Traceback" not in p.stderr
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    assert [r["fault/skipped_steps"] for r in rows] == [0, 0, 1, 2, 3]
    assert [r["sync/version"] for r in rows] == [1, 2, 2, 2, 2]  # no update, no sync
    # the ledger of the skipped steps: every sample booked as not trained, 0 passes by the
    # learner's own count; those of the good steps trained once each
    from rlhf_dist.ledger import read_ledger

    ledger = read_ledger(run)
    skipped = [r for r in ledger if r["step"] >= 3]
    assert skipped and {(r.get("dropped"), r["updates"]) for r in skipped} == {
        ("nonfinite_step", 0)
    }
    assert {(r.get("dropped"), r["updates"]) for r in ledger if r["step"] < 3} == {(None, 2)}
    assert [c.name for c in checkpoint_dirs(run)] == ["step-00000002"]
    assert read_state(checkpoint_dirs(run)[0])["step"] == 2
    # checkpoint.save_hf: the checkpoint's policy as a plain Hugging Face directory
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf = checkpoint_dirs(run)[0] / "policy_hf"
    assert AutoModelForCausalLM.from_pretrained(hf).num_parameters() > 0
    assert AutoTokenizer.from_pretrained(hf).eos_token == "[EOS]"
