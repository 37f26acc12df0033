"""Checkpoints and exact resume: a driver killed with SIGKILL at a named point, resumed with
``launch.py --resume``, writes the same metrics for the steps after its checkpoint as a run
never killed.

The kill lands at a named point, the same in every run: the runs score with
``kill_points:reward`` (``tests/helpers/kill_points.py``: the built-in reward, trapped), and
in the killed run the kill point is armed to catch step 6's first reward call, after the five
calls of steps 1-5 (8 prompts, one reward scorer, one chunk a step). The scorer holds in
that call and the test kills the driver's whole process group: step 6 was under way, so the
newest checkpoint is step 4 (``checkpoint.every=2``, two on disk) and step 5's row was written
after it. The adaptive KL coefficient moves every step, so every piece of run state shows.

Planted bugs this test fails on (each run once, 2026-12-03): a resume that loads the engines
of the oldest checkpoint on disk instead of the newest (``driver/checkpoints.load_newest``)
fails ``assert_same_runs``; a resume that forgets the adaptive KL controller's state
(``RunState.load_state_dict``) fails it too (``train/kl_coef`` 0.05 != 0.0484 at step 5).
"""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from rlhf_dist.checkpoint import checkpoint_dirs, layout_from_files, read_state

ROOT = Path(__file__).resolve().parents[2]
HELPERS = ROOT / "tests" / "helpers"
sys.path.insert(0, str(HELPERS))
from compare_runs import assert_same_runs  # noqa: E402
from kill_points import ENV, KillPoint  # noqa: E402

REWARD_CALLS_PER_STEP = 1  # 8 prompts for one reward scorer: one chunk per scorer
TRAPPED = "reward.function=kill_points:reward"
# The workers (started by launch.py's own Ray) import the trapped reward through PYTHONPATH.
ENV_WITH_HELPERS = dict(os.environ, PYTHONPATH=str(HELPERS))


def _args(tiny_assets, run_dir, *extra):
    return [
        sys.executable,
        str(ROOT / "launch.py"),
        "--config",
        "configs/smoke.yaml",
        f"model.assets_dir={tiny_assets.parent}",
        f"run.dir={run_dir}",
        "run.steps=7",
        "checkpoint.every=2",
        # several checkpoints on disk: a resume that took an older one's engines shows
        "checkpoint.keep=3",
        # every piece of run state that can change moves: the KL coefficient adapts
        "ppo.adaptive_kl=true",
        "ppo.kl_target=0.001",
        "ppo.kl_horizon=100",
        "learner.num_workers=1",
        "wandb.enabled=false",
        *extra,
    ]


def _rows(run_dir, name="metrics.jsonl"):
    """The complete rows (a kill may cut the last line short)."""
    path = run_dir / name
    rows = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return rows


def test_sigkill_then_resume_matches_an_uninterrupted_run(tiny_assets, tmp_path):
    straight = tmp_path / "straight"
    p = subprocess.run(
        _args(tiny_assets, straight, TRAPPED),
        cwd=ROOT,
        env=ENV_WITH_HELPERS,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    # the last step is checkpointed too, and only the last three are kept
    assert [c.name for c in sorted((straight / "checkpoints").iterdir())] == [
        "step-00000004",
        "step-00000006",
        "step-00000007",
    ]
    coefs = [r["train/kl_coef"] for r in _rows(straight)]
    assert len(set(coefs)) == len(coefs)  # the adaptive coefficient moved every step

    killed = tmp_path / "killed"
    point = KillPoint(tmp_path / "kill-point")
    point.arm(skip=5 * REWARD_CALLS_PER_STEP)  # steps 1-5 pass; step 6's first call is held
    proc = subprocess.Popen(
        _args(tiny_assets, killed, TRAPPED),
        cwd=ROOT,
        env={**ENV_WITH_HELPERS, ENV: str(point.dir)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        point.caught(timeout_s=300, alive=lambda: proc.poll() is None)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and everything it started
        proc.wait(timeout=60)
    assert [c.name for c in checkpoint_dirs(killed)] == ["step-00000002", "step-00000004"]
    newest = checkpoint_dirs(killed)[-1]
    assert read_state(newest)["step"] == 4
    # the layout the engine states were written with, recorded and as DeepSpeed's files show it
    layout = {"num_workers": 1, "zero_stage": 2}  # configs/smoke.yaml sets ZeRO-2
    assert read_state(newest)["learner"] == layout == layout_from_files(newest)
    assert [r["step"] for r in _rows(killed)] == [1, 2, 3, 4, 5]  # step 5's came after it

    p = subprocess.run(
        # auto resumes at the stage of the checkpoint (2), not at auto's own choice for one
        # rank (0), whose engine could not load these states
        [
            sys.executable,
            str(ROOT / "launch.py"),
            "--resume",
            str(killed),
            "learner.zero_stage=auto",
        ],
        cwd=ROOT,
        env=ENV_WITH_HELPERS,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    assert "resumed from" in p.stdout and newest.name in p.stdout
    assert "zero_stage: 2" in (killed / "config.yaml").read_text()

    assert [r["step"] for r in _rows(killed)] == list(range(1, 8))  # steps after it redone
    # every metric of every step, the exported final policies and the samples trained equal
    # the run never killed
    assert_same_runs(killed, straight, policy="ppo/policy", abs=1e-6, weights_atol=1e-5)
    # the row written after the checkpoint is kept aside, not lost
    assert [r["step"] for r in _rows(killed, "metrics.rolled_back.jsonl")] == [5]


@pytest.mark.parametrize("damage", ["truncate_engine", "corrupt_state"])
def test_damaged_latest_checkpoint_falls_back_to_the_previous(tiny_assets, tmp_path, damage):
    run = tmp_path / "run"
    p = subprocess.run(
        _args(tiny_assets, run, "run.steps=4"),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    latest = run / "checkpoints" / "step-00000004"
    if damage == "truncate_engine":
        f = next((latest / "policy" / "state").glob("*model_states.pt"))
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    else:
        (latest / "state.json").write_text('{"step": 4, "vers')
    # a save that was killed half-way also lies around; it must be ignored
    (run / "checkpoints" / ".tmp-step-00000006" / "policy").mkdir(parents=True)
    p = subprocess.run(
        [sys.executable, str(ROOT / "launch.py"), "--resume", str(run), "run.steps=5"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    assert "checkpoint step-00000004 is unusable" in p.stdout
    assert "resumed from" in p.stdout and "step-00000002" in p.stdout
    assert [r["step"] for r in _rows(run)] == [1, 2, 3, 4, 5]
