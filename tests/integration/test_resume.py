"""Checkpoints and exact resume: a driver killed with SIGKILL after step k, resumed with
``launch.py --resume``, writes the same metrics for the steps after k as a run never killed."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rlhf_dist.checkpoint import checkpoint_dirs, read_state

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "helpers"))
from compare_runs import assert_same_runs  # noqa: E402


def _args(tiny_assets, run_dir, *extra):
    return [
        sys.executable,
        str(ROOT / "launch.py"),
        "--config",
        "configs/smoke.yaml",
        f"model.assets_dir={tiny_assets.parent}",
        f"run.dir={run_dir}",
        "run.steps=5",
        "checkpoint.every=2",
        "checkpoint.keep=2",
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
        _args(tiny_assets, straight), cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert p.returncode == 0, p.stderr[-3000:]
    # the last step is checkpointed too, and only the last two are kept
    assert [c.name for c in sorted((straight / "checkpoints").iterdir())] == [
        "step-00000004",
        "step-00000005",
    ]

    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        _args(tiny_assets, killed),
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.time() + 300
    while time.time() < deadline and not any(r.get("step") == 3 for r in _rows(killed)):
        time.sleep(0.2)
    assert any(r.get("step") == 3 for r in _rows(killed)), "the run never reached step 3"
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and everything it started
    proc.wait(timeout=60)
    # The kill lands after step 3's row: usually before step 4's checkpoint, sometimes after.
    newest = checkpoint_dirs(killed)[-1]
    k = read_state(newest)["step"]
    assert k in (2, 4), k
    written_after = [r["step"] for r in _rows(killed) if r["step"] > k]

    p = subprocess.run(
        [sys.executable, str(ROOT / "launch.py"), "--resume", str(killed)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    assert "resumed from" in p.stdout and newest.name in p.stdout

    assert [r["step"] for r in _rows(killed)] == [1, 2, 3, 4, 5]  # steps after k redone once
    # every metric of every step, and the exported final policies, equal the run never killed
    assert_same_runs(killed, straight, policy="ppo/policy", abs=1e-6, weights_atol=1e-5)
    if written_after:  # rows written after the checkpoint are kept aside, not lost
        rolled_back = _rows(killed, "metrics.rolled_back.jsonl")
        assert [r["step"] for r in rolled_back] == written_after


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
