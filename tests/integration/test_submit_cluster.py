"""``launch.py --submit`` and ``launch.py --address`` against a real two-node Ray cluster.

The module starts its own cluster the way a user does: ``ray start --head`` (with the dashboard,
which runs the job server) and a second node with ``ray start --address``, on loopback, with
Ray's token authentication on (``RAY_AUTH_MODE=token``, a fresh token in ``RAY_AUTH_TOKEN``;
``~/.ray/auth_token`` is never read or written: HOME points at a temporary directory). Every
port is a free one and the cluster has a temporary ``--temp-dir`` of its own, so it lives next to
any other Ray on the machine. Each ``ray start --block`` runs in a session of its own; at the end
exactly those sessions (and any process naming the temp dir) are stopped. ``ray stop`` is never
called: it would stop every Ray process on the machine.

Each node has 2 CPUs and the smoke config asks for 3.5, so its actors must use both nodes.
"""

import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import requests

ROOT = Path(__file__).resolve().parents[2]
LAUNCH = ROOT / "launch.py"
BIN = Path(sys.executable).parent
RAY = BIN / "ray"

pytestmark = pytest.mark.timeout(600)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(what: str, check, timeout: float, logs=()) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.5)
    tails = "\n".join(f"--- {p}\n{Path(p).read_text()[-3000:]}" for p in logs if Path(p).exists())
    raise TimeoutError(f"{what}: not within {timeout:.0f}s\n{tails}")


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _stop(procs: list[subprocess.Popen], marker: str) -> None:
    """Stop the cluster we started, and nothing else.

    SIGTERM to a ``ray start --block`` drains its node and stops that node's Ray processes
    (a couple of seconds). Whatever is left of our sessions, or names our temp dir, is killed.
    """
    import psutil

    for p in reversed(procs):  # the worker node first, then the head
        if p.poll() is None:
            p.terminate()
    for p in procs:
        try:
            p.wait(timeout=40)
        except subprocess.TimeoutExpired:
            pass
    sessions = {p.pid for p in procs}
    left = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if os.getsid(proc.pid) in sessions or marker in " ".join(proc.info["cmdline"] or []):
                left.append(proc)
        except (psutil.Error, OSError):
            continue
    for proc in left:
        try:
            proc.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(left, timeout=10)


@pytest.fixture(scope="module")
def cluster():
    token = secrets.token_hex(32)
    # short: Ray puts unix sockets under it (107-character limit)
    temp = tempfile.mkdtemp(prefix="rsub", dir="/tmp")
    home = Path(temp) / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_AUTH"))}
    env.update(
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",  # the cluster's `python` is this venv's
        HOME=str(home),
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN=token,
        RAY_USAGE_STATS_ENABLED="0",
        WANDB_MODE="disabled",
    )
    gcs, dash, client = _free_port(), _free_port(), _free_port()
    common = [
        "--block",
        "--node-ip-address=127.0.0.1",
        "--num-cpus=2",
        "--num-gpus=0",
        "--object-store-memory=200000000",
        "--disable-usage-stats",
    ]
    head_log, worker_log = Path(temp) / "head.log", Path(temp) / "worker.log"
    procs = []

    def start(args, log):
        with open(log, "w") as out:
            p = subprocess.Popen(
                [str(RAY), "start", *args, *common],
                env=env,
                cwd=temp,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        procs.append(p)

    url = f"http://127.0.0.1:{dash}"
    auth = {"Authorization": f"Bearer {token}"}

    def two_nodes_alive() -> bool:
        try:
            r = requests.get(f"{url}/api/v0/nodes", headers=auth, timeout=5)
            nodes = r.json()["data"]["result"]["result"]
        except (requests.RequestException, ValueError, KeyError, TypeError):
            return False
        return sum(n.get("state") == "ALIVE" for n in nodes) >= 2

    try:
        start(
            [
                "--head",
                f"--port={gcs}",
                "--include-dashboard=true",
                "--dashboard-host=127.0.0.1",
                f"--dashboard-port={dash}",
                f"--ray-client-server-port={client}",
                f"--dashboard-agent-listen-port={_free_port()}",
                f"--temp-dir={temp}",
            ],
            head_log,
        )
        logs = (head_log, worker_log)
        _wait("the head's GCS port", lambda: _port_open(gcs), 90, logs)
        start(
            [f"--address=127.0.0.1:{gcs}", f"--dashboard-agent-listen-port={_free_port()}"],
            worker_log,
        )
        _wait("two alive nodes seen by the job server", two_nodes_alive, 120, logs)
        yield SimpleNamespace(
            url=url, gcs=f"127.0.0.1:{gcs}", env=env, auth=auth, temp=temp, home=home
        )
    finally:
        _stop(procs, temp)
        shutil.rmtree(temp, ignore_errors=True)


def _launch(env, *args, timeout=300):
    return subprocess.run(
        [sys.executable, str(LAUNCH), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _smoke_args(tiny_assets, run_dir):
    return [
        "--config",
        "configs/smoke.yaml",
        f"run.dir={run_dir}",
        "run.steps=1",
        f"model.assets_dir={tiny_assets.parent}",
        "wandb.enabled=false",
    ]


def _job_id(stdout: str) -> str:
    m = re.search(r"submitted job (\S+) to ", stdout)
    assert m, stdout[-2000:]
    return m.group(1)


def _metrics_steps(run_dir: Path) -> list[int]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in rows]


def test_submit_runs_the_smoke_config_as_a_ray_job_across_both_nodes(
    cluster, tiny_assets, tmp_path
):
    run_dir = tmp_path / "submitted"  # absolute: the job's own working dir is a temp dir
    p = _launch(
        cluster.env, "--submit", cluster.url, "--no-pip", *_smoke_args(tiny_assets, run_dir)
    )
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    job_id = _job_id(p.stdout)
    assert "step 1/1" in p.stdout  # the job's logs were followed
    assert f"job {job_id} succeeded" in p.stdout
    assert "Traceback" not in p.stderr
    assert _metrics_steps(run_dir) == [1]
    assert (run_dir / "config.yaml").is_file()

    # it ran as a Ray Job from an uploaded copy of the project, with the entrypoint we expect
    r = requests.get(f"{cluster.url}/api/jobs/{job_id}", headers=cluster.auth, timeout=10)
    info = r.json()
    assert info["status"] == "SUCCEEDED"
    assert info["entrypoint"].startswith("python launch.py --address auto --config configs/smoke")
    assert info["runtime_env"]["working_dir"].startswith("gcs://")
    assert "pip" not in info["runtime_env"]
    # and its actors were spread over both nodes (2 + 2 CPUs for 3.5 CPUs of actors)
    r = requests.get(
        f"{cluster.url}/api/v0/actors",
        params={"limit": 1000, "detail": 1},
        headers=cluster.auth,
        timeout=10,
    )
    actors = r.json()["data"]["result"]["result"]
    nodes = {
        a["node_id"]
        for a in actors
        if a.get("job_id") == info["job_id"] and a.get("class_name") != "JobSupervisor"
    }
    assert len(nodes) == 2, [(a.get("class_name"), a.get("node_id")) for a in actors]


def test_address_joins_the_running_cluster_from_one_of_its_nodes(cluster, tiny_assets, tmp_path):
    run_dir = tmp_path / "joined"
    p = _launch(cluster.env, "--address", cluster.gcs, *_smoke_args(tiny_assets, run_dir))
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "step 1/1" in p.stdout
    assert "Started a local Ray instance" not in p.stdout + p.stderr
    assert _metrics_steps(run_dir) == [1]


def test_a_failing_job_exits_nonzero_with_its_id_and_the_tail_of_its_logs(
    cluster, tiny_assets, tmp_path
):
    # loads fine here, but the prompts file does not exist on the cluster: preflight fails there
    args = [*_smoke_args(tiny_assets, tmp_path / "r"), f"data.prompts={tmp_path}/missing.jsonl"]
    p = _launch(cluster.env, "--submit", cluster.url, "--no-pip", *args, timeout=180)
    assert p.returncode == 1, p.stdout[-3000:] + p.stderr[-3000:]
    job_id = _job_id(p.stdout)
    assert f"error: job {job_id} FAILED" in p.stderr
    assert f"last 40 lines of the logs of job {job_id}" in p.stderr
    assert "data.prompts" in p.stderr.split("last 40 lines", 1)[1]  # the job's own error
    assert f"ray job logs --address {cluster.url} {job_id}" in p.stderr


def test_no_wait_prints_the_job_id_and_how_to_follow_it(cluster, tiny_assets, tmp_path):
    args = [*_smoke_args(tiny_assets, tmp_path / "r"), f"data.prompts={tmp_path}/missing.jsonl"]
    p = _launch(
        cluster.env, "--submit", cluster.url, "--no-pip", "--no-wait", "--job-id", "nowait-1", *args
    )
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert _job_id(p.stdout) == "nowait-1"
    assert f"ray job logs --address {cluster.url} --follow nowait-1" in p.stdout

    def finished():
        r = requests.get(f"{cluster.url}/api/jobs/nowait-1", headers=cluster.auth, timeout=10)
        return r.json()["status"] in ("SUCCEEDED", "FAILED", "STOPPED")

    _wait("the detached job to finish", finished, 120)  # it was really submitted


def test_a_missing_or_wrong_token_is_refused_with_a_clear_message(cluster, tiny_assets, tmp_path):
    args = ["--submit", cluster.url, "--no-pip", *_smoke_args(tiny_assets, tmp_path / "r")]
    no_token = {k: v for k, v in cluster.env.items() if not k.startswith("RAY_AUTH")}
    wrong = {**cluster.env, "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    for env, says in ((no_token, "set RAY_AUTH_MODE=token"), (wrong, "the token sent was refused")):
        p = _launch(env, *args, timeout=60)
        assert p.returncode == 1, p.stdout[-2000:] + p.stderr[-2000:]
        assert "refused the request" in p.stderr and says in p.stderr, p.stderr[-2000:]
        assert "Traceback" not in p.stderr
        assert "submitted job" not in p.stdout


def test_an_unreachable_job_server_fails_fast_with_one_clear_line(tiny_assets, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_AUTH"))}
    env["HOME"] = str(tmp_path)  # no ~/.ray/auth_token
    url = f"http://127.0.0.1:{_free_port()}"  # nothing listens there
    t0 = time.monotonic()
    p = _launch(env, "--submit", url, *_smoke_args(tiny_assets, tmp_path / "r"), timeout=60)
    assert p.returncode == 1, p.stdout[-2000:] + p.stderr[-2000:]
    assert f"error: cannot reach the Ray job server at {url}" in p.stderr
    assert "Traceback" not in p.stderr
    assert time.monotonic() - t0 < 45
    # and a bad config is refused before anything is sent
    p = _launch(env, "--submit", url, "--config", "configs/smoke.yaml", "rollout.temprature=1")
    assert p.returncode == 2 and "rollout.temprature: unknown key" in p.stderr
