"""``launch.py`` as a user runs it: a subprocess that starts (and stops) its own Ray cluster."""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
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


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def current_cluster_file():
    """Ray's "current cluster" file (``/tmp/ray/ray_current_cluster``): a plain ``ray.init()``
    joins the cluster it names. Whatever the test leaves there is put back as it was."""
    from ray._common.utils import get_ray_address_file

    path = Path(get_ray_address_file(None))
    before = path.read_text() if path.exists() else None
    yield path
    if before is None:
        path.unlink(missing_ok=True)
    else:
        path.write_text(before)


def test_the_default_launch_starts_its_own_cluster_beside_another(
    tiny_assets, tmp_path, current_cluster_file
):
    """A cluster started with ``ray start`` on this machine names itself in Ray's current-cluster
    file; a default launch (no ``--address``) must start a Ray of its own anyway, not join it
    and fail on ``num_cpus`` (Ray's ValueError "When connecting to an existing cluster,
    num_cpus and num_gpus must not be provided"), and must leave that cluster alone. Then the
    cluster is killed, leaving a stale file behind: a default start still works. Run against
    the code before the fix (``ray.init`` without ``address="local"``), the launch exits 1 with
    that ValueError."""
    import os
    import signal

    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_AUTH"))}
    env.update(HOME=str(home), RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0")
    ray_bin = Path(sys.executable).parent / "ray"
    head = subprocess.Popen(
        [str(ray_bin), "start", "--head", "--block", f"--port={_free_port()}", "--num-cpus=1"]
        + ["--include-dashboard=false", "--disable-usage-stats"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 90
        while not current_cluster_file.exists():
            assert head.poll() is None and time.monotonic() < deadline, "ray start failed"
            time.sleep(0.5)
        beside = current_cluster_file.read_text()
        run_dir = tmp_path / "run"
        p = _launch(
            "--config",
            "configs/smoke.yaml",
            f"model.assets_dir={tiny_assets.parent}",
            f"run.dir={run_dir}",
            "run.steps=1",
            "learner.num_workers=1",
            "wandb.enabled=false",
        )
        assert p.returncode == 0, p.stderr[-3000:]
        assert "step 1/1" in p.stdout
        assert "Connecting to existing Ray cluster" not in p.stdout + p.stderr
        assert head.poll() is None and current_cluster_file.read_text() == beside  # untouched
    finally:
        os.killpg(head.pid, signal.SIGKILL)  # killed, not stopped: its processes go, the file stays
        head.wait(timeout=30)
        _kill_session(head.pid)
    assert current_cluster_file.exists()  # stale now
    start_and_stop = (
        "from rlhf_dist.config import load_config\n"
        "from rlhf_dist.launch import init_ray\n"
        "import ray\n"
        "assert init_ray(load_config(None, ['ray.num_cpus=2']), '')\n"
        "assert ray.cluster_resources()['CPU'] == 2\n"
        "ray.shutdown()\n"
        "print('own cluster')\n"
    )
    p = subprocess.run(
        [sys.executable, "-c", start_and_stop],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 0 and "own cluster" in p.stdout, p.stderr[-3000:]


def _kill_session(sid: int) -> None:
    """Whatever is left of a killed ``ray start`` session (its raylet, GCS, workers)."""
    import os

    import psutil

    left = []
    for proc in psutil.process_iter():
        try:
            if os.getsid(proc.pid) == sid:
                left.append(proc)
        except (psutil.Error, OSError):
            continue
    for proc in left:
        try:
            proc.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(left, timeout=10)
