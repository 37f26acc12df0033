"""``launch.py`` as a user runs it: a subprocess that starts (and stops) its own Ray cluster."""

import json
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]


def _launch(*args, timeout=600):
    return subprocess.run(
        [sys.executable, str(ROOT / "launch.py"), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_smoke_config_runs_end_to_end_with_wandb_off_and_unimportable(tiny_assets, tmp_path):
    run_dir = tmp_path / "smoke"
    args = [
        "--config",
        "configs/smoke.yaml",
        f"model.assets_dir={tiny_assets.parent}",
        f"run.dir={run_dir}",
        "run.steps=2",
        "wandb.enabled=false",
    ]
    block_wandb = (
        "import sys, runpy; sys.modules['wandb'] = None; "
        f"sys.argv = ['launch.py', *{args!r}]; runpy.run_path('launch.py', run_name='__main__')"
    )
    p = subprocess.run(
        [sys.executable, "-c", block_wandb], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert p.returncode == 0, p.stderr[-3000:]
    assert "step 2/2" in p.stdout
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    dumped = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert dumped["learner"]["num_workers"] == 2  # configs/smoke.yaml's two ranks
    assert not (run_dir / "wandb").exists()
    # the report is written at the end of every run
    assert (run_dir / "report" / "reward.png").is_file()


def test_bad_input_fails_before_any_actor_with_the_key_named(tiny_assets, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    cases = {
        "rollout.temprature=0.7": "rollout.temprature: unknown key; did you mean 'rollout.temperature'",
        "rollout.prompts_per_step=7": "samples per step (rollout.prompts_per_step * rollout.samples_per_prompt)=7 must be divisible by ppo.minibatch_size=8",
        f"model.policy={tmp_path}/nope": "model.policy: model path",
        f"data.prompts={empty}": "holds no prompts",
        "reward.function=no_such_module:score": "reward.function: cannot import module 'no_such_module'",
    }
    for override, message in cases.items():
        p = _launch(
            "--config",
            "configs/smoke.yaml",
            f"model.assets_dir={tiny_assets.parent}",
            override,
            f"run.dir={tmp_path}/r",
            timeout=120,
        )
        assert p.returncode == 2, (override, p.stderr[-2000:])
        assert message in p.stderr, (override, p.stderr[-2000:])
        assert "Traceback" not in p.stderr
        assert "Started a local Ray instance" not in p.stderr + p.stdout
