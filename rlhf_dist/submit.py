"""Run a job on a Ray cluster through its job server: ``launch.py --submit http://<head>:8265``.

The project directory travels as the job's ``working_dir`` (without ``.venv``, ``runs``, ...),
the entrypoint is ``python launch.py --address auto --config <config> <overrides>`` run on the
cluster, and the project's Python dependencies (all but torch and ray, which a cluster image
has) go in ``runtime_env["pip"]``, pinned as ``constraints.txt`` pins them. ``--no-pip`` (or
``RLHF_DIST_NO_PIP=1``) leaves pip out, for clusters whose image already holds the project's
dependencies.

Token authentication (Ray >= 2.52; on for ``ray start`` clusters in Ray 2.60): the token is
sent as ``Authorization: Bearer <token>``, found where Ray's own loader finds it, in this order:
``RAY_AUTH_TOKEN``, the file ``RAY_AUTH_TOKEN_PATH`` names, ``~/.ray/auth_token``. Ray's job
client sends it only when ``RAY_AUTH_MODE=token``; here it is also sent when ``RAY_AUTH_MODE``
is unset and a token exists (which is how ``ray start`` decides to turn authentication on).
``RAY_AUTH_MODE=disabled`` sends none.

A head started moments ago may refuse jobs until its job agent is up ("No available agent to
submit job"): submitting is retried, with backoff, for up to a minute (``submit_job``).

The run directory is written on the cluster: a relative ``run.dir`` lands in the job's
temporary working directory on the head node, so give an absolute path on shared storage.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import re
import secrets
import shlex
import sys
import time
from collections.abc import Mapping
from pathlib import Path

from rlhf_dist.config import ConfigError, load_config
from rlhf_dist.ray_env import JOB_ENV, WORKER_KEYS

PROJECT_ROOT = Path(__file__).resolve().parent.parent
# Never uploaded: environments, outputs and caches (Ray also honours .gitignore files).
EXCLUDES = [
    ".venv",
    "venv",
    ".git",
    "runs",
    "wandb",
    "__pycache__",
    "*.egg-info",
    ".pytest_cache",
    ".ruff_cache",
    "build",
    "dist",
]
# A cluster image brings these (with the CUDA build of torch that matches its drivers).
NOT_PIP_INSTALLED = {"torch", "ray"}
NO_PIP_ENV = "RLHF_DIST_NO_PIP"
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
TAIL_LINES = 40
# What a head whose dashboard is up but whose job agent is not (yet) answers a submission
# (Ray's job_head.py: HTTP 500, raised by the client as RuntimeError). A just-started head gets
# there within seconds; submitting is retried, with backoff, for up to AGENT_WAIT_S.
AGENT_NOT_UP = "No available agent to submit job"
AGENT_WAIT_S = 60.0
AGENT_RETRY_MAX_S = 8.0


class SubmitError(RuntimeError):
    """A problem reaching or using the job server; the message is meant for the user."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``--submit`` family of flags (``launch.py`` adds them to its parser)."""
    g = parser.add_argument_group("submitting to a Ray cluster (Ray Jobs)")
    g.add_argument(
        "--submit",
        default="",
        metavar="URL",
        help="submit the run as a Ray Job to this job server (http://<head>:8265)",
    )
    g.add_argument(
        "--no-wait",
        action="store_true",
        help="with --submit: print the job id and return instead of following the job",
    )
    g.add_argument(
        "--no-pip",
        action="store_true",
        help=f"with --submit: install nothing on the cluster (its image has the project's "
        f"dependencies); also {NO_PIP_ENV}=1",
    )
    g.add_argument(
        "--job-id",
        default="",
        help="with --submit: the job's submission id (default: <run.name>-<time>-<random>)",
    )
    g.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="NAME[=VALUE]",
        help="with --submit: set an environment variable for the job; NAME alone forwards "
        "this shell's value (e.g. --env WANDB_API_KEY --env HF_TOKEN); repeatable",
    )


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse flag combinations that make no sense (exits through ``parser.error``)."""
    if args.submit:
        if getattr(args, "address", ""):
            parser.error("--submit and --address exclude each other")
        return
    given = [
        flag
        for flag, value in (
            ("--no-wait", args.no_wait),
            ("--no-pip", args.no_pip),
            ("--job-id", args.job_id),
            ("--env", args.env),
        )
        if value
    ]
    if given:
        parser.error(f"{', '.join(given)} only apply with --submit URL")


# ----------------------------------------------------------------------------- what is sent


def config_in_project(config_path: str | Path, root: Path = PROJECT_ROOT) -> str:
    """The config's path relative to the project (what the job sees), or ConfigError."""
    path = Path(config_path).expanduser().resolve()
    try:
        return path.relative_to(root.resolve()).as_posix()
    except ValueError:
        raise ConfigError(
            f"config file {str(config_path)!r} is outside the project directory {str(root)!r}; "
            "with --submit only the project directory is uploaded: put the config inside it "
            "(e.g. configs/)"
        ) from None


def entrypoint(config_rel: str, overrides: list[str]) -> str:
    """The shell command the job runs in its working directory on the cluster."""
    # --address auto: inside a job, ray.init joins the job's cluster (RAY_ADDRESS is set).
    argv = ["python", "launch.py", "--address", "auto", "--config", config_rel, *overrides]
    return shlex.join(argv)


def _constraints(root: Path) -> dict[str, str]:
    """``name -> pin`` from constraints.txt (``torch==2.13.0`` -> ``{"torch": "==2.13.0"}``)."""
    from packaging.requirements import InvalidRequirement, Requirement
    from packaging.utils import canonicalize_name

    pins: dict[str, str] = {}
    path = root / "constraints.txt"
    if not path.is_file():
        return pins
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        try:
            req = Requirement(line)
        except InvalidRequirement:
            continue
        pins[canonicalize_name(req.name)] = str(req.specifier)
    return pins


def _declared_dependencies(root: Path) -> list[str]:
    """``[project].dependencies`` of the project's pyproject.toml (or the installed metadata)."""
    pyproject = root / "pyproject.toml"
    if pyproject.is_file():
        try:
            import tomllib
        except ModuleNotFoundError:  # Python 3.10
            tomllib = None
        if tomllib is not None:
            return list(tomllib.loads(pyproject.read_text())["project"].get("dependencies", []))
    from importlib.metadata import requires

    return [r for r in requires("rlhf_dist") or [] if "extra ==" not in r]


def pip_packages(root: Path = PROJECT_ROOT) -> list[str]:
    """The project's dependencies for ``runtime_env["pip"]``: all but torch and ray, each
    pinned as constraints.txt pins it (so the cluster gets the versions tested here)."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    pins = _constraints(root)
    out = []
    for spec in _declared_dependencies(root):
        req = Requirement(spec)
        name = canonicalize_name(req.name)
        if name in NOT_PIP_INSTALLED:
            continue
        extras = f"[{','.join(sorted(req.extras))}]" if req.extras else ""
        marker = f"; {req.marker}" if req.marker else ""  # evaluated by pip on the cluster
        out.append(f"{req.name}{extras}{pins.get(name) or req.specifier}{marker}")
    return out


def job_env(pairs: list[str], environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """``env_vars`` of the job: JOB_ENV plus ``--env NAME[=VALUE]`` (NAME alone forwards)."""
    env = dict(JOB_ENV)
    for item in pairs:
        name, sep, value = item.partition("=")
        name = name.strip()
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            raise ConfigError(f"--env {item!r}: expected NAME or NAME=VALUE")
        if name in WORKER_KEYS:
            raise ConfigError(
                f"--env {name}: launch.py sets it for the workers already (rlhf_dist/ray_env.py)"
            )
        if not sep:
            if name not in environ:
                raise ConfigError(f"--env {name}: not set in this shell (use {name}=VALUE)")
            value = environ[name]
        env[name] = value
    return env


def runtime_env(
    pip: bool, env_vars: dict[str, str], root: Path = PROJECT_ROOT
) -> dict[str, object]:
    """The job's ``runtime_env``: the project as working_dir, its dependencies, its env."""
    renv: dict[str, object] = {
        "working_dir": str(root),
        "excludes": list(EXCLUDES),
        "env_vars": dict(env_vars),
    }
    if pip:
        renv["pip"] = {"packages": pip_packages(root), "pip_check": False}
    return renv


def pip_wanted(args: argparse.Namespace, environ: Mapping[str, str] = os.environ) -> bool:
    off = environ.get(NO_PIP_ENV, "").strip().lower() in ("1", "true", "yes", "on")
    return not (args.no_pip or off)


def default_job_id(run_name: str) -> str:
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "-", run_name).strip("-") or "run"
    return f"{safe}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"


# ----------------------------------------------------------------------------- token auth


def auth_token(environ: Mapping[str, str] = os.environ) -> str | None:
    """The Ray auth token to send, looked up as Ray's loader does; None if there is none or
    ``RAY_AUTH_MODE=disabled``. Raises SubmitError when token mode is on but none is found."""
    mode = environ.get("RAY_AUTH_MODE", "").strip().lower()
    if mode == "disabled":
        return None
    token = environ.get("RAY_AUTH_TOKEN", "").strip()
    path_var = environ.get("RAY_AUTH_TOKEN_PATH", "").strip()
    if not token and path_var:
        path = Path(path_var).expanduser()
        try:
            token = path.read_text().strip()
        except OSError as e:
            raise SubmitError(f"RAY_AUTH_TOKEN_PATH={path_var}: cannot read it ({e})") from None
        if not token:
            raise SubmitError(f"RAY_AUTH_TOKEN_PATH={path_var}: the file is empty")
    if not token:
        default = Path(environ.get("HOME") or Path.home()) / ".ray" / "auth_token"
        if default.is_file():
            token = default.read_text().strip()
    if not token and mode == "token":
        raise SubmitError(
            "RAY_AUTH_MODE=token but no token found: set RAY_AUTH_TOKEN, or RAY_AUTH_TOKEN_PATH, "
            "or put the cluster's token in ~/.ray/auth_token (`ray get-auth-token` on the head "
            "node prints it)"
        )
    return token or None


# ----------------------------------------------------------------------------- talking to Ray


def _one_line(e: BaseException | str) -> str:
    text = " ".join(str(e).split()).rstrip(".") or type(e).__name__
    return text if len(text) < 400 else text[:400] + "..."


def connect(url: str, environ: Mapping[str, str] = os.environ):
    """A JobSubmissionClient for ``url``, or SubmitError with a one-line reason."""
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    _quiet_ray_logs()  # after the imports: importing ray sets its loggers up
    if not re.match(r"^https?://", url):
        raise SubmitError(
            f"--submit {url!r}: expected the job server's URL, e.g. http://<head>:8265 "
            "(to join a cluster from one of its nodes, use --address instead)"
        )
    token = auth_token(environ)
    headers = {"Authorization": f"Bearer {token}"} if token else None
    try:
        return JobSubmissionClient(url, headers=headers)
    except AuthenticationError as e:
        raise SubmitError(_auth_message(url, e, token)) from None
    except Exception as e:  # ConnectionError, requests errors, version checks ...
        if "401" in str(e) or "403" in str(e):
            raise SubmitError(_auth_message(url, e, token)) from None
        raise SubmitError(
            f"cannot reach the Ray job server at {url}: {_one_line(e)}. Is the cluster up, "
            "with its dashboard (ray start --head --include-dashboard=true; port 8265 by "
            "default) reachable from here (e.g. `ray dashboard cluster.yaml` or "
            "`kubectl port-forward svc/<cluster>-head-svc 8265`)?"
        ) from None


def _auth_message(url: str, e: BaseException, token: str | None) -> str:
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if token:
        hint = "the token sent was refused: use the cluster's token (`ray get-auth-token` on "
        hint += "its head node) in RAY_AUTH_TOKEN or ~/.ray/auth_token"
    else:
        hint = "the cluster uses token authentication: set RAY_AUTH_MODE=token and its token "
        hint += "in RAY_AUTH_TOKEN or ~/.ray/auth_token"
    return f"the Ray job server at {url} refused the request ({first}); {hint}"


def _quiet_ray_logs() -> None:
    """Ray's client logs every file it skips while packaging; keep the terminal for the job."""
    for name in (
        "ray._private.runtime_env.packaging",
        "ray._private.runtime_env.working_dir",
        "ray.dashboard.modules.dashboard_sdk",
        "ray.dashboard.modules.job.sdk",
    ):
        logging.getLogger(name).setLevel(logging.ERROR)


def _tail(text: str, n: int = TAIL_LINES) -> str:
    lines = text.rstrip("\n").splitlines()
    return "\n".join(lines[-n:])


def submit_job(
    client,
    url: str,
    *,
    deadline_s: float | None = None,
    sleep=time.sleep,
    clock=time.monotonic,
    **job,
) -> str:
    """``client.submit_job(**job)``, retried while the head answers that its job agent is not
    up yet (a head started moments ago); SubmitError once ``deadline_s`` (default AGENT_WAIT_S)
    has passed. Any other error is raised at once, as it came."""
    deadline_s = AGENT_WAIT_S if deadline_s is None else deadline_s
    start = clock()
    delay = 1.0
    while True:
        try:
            return client.submit_job(**job)
        except Exception as e:
            if AGENT_NOT_UP not in str(e):
                raise
        left = deadline_s - (clock() - start)
        if left <= 0:
            raise SubmitError(
                f"the Ray head at {url} has a job server but its job agent never came up: "
                f"every submission in {deadline_s:.0f} s was answered {AGENT_NOT_UP!r}. Is the "
                "head node healthy (`ray status` there; its logs' dashboard_agent.log)?"
            )
        wait = min(delay, left)
        print(
            f"[submit] the head's job agent is not up yet (a just-started head?); retrying "
            f"in {wait:.3g} s ({left:.0f} s left before giving up)",
            flush=True,
        )
        sleep(wait)
        delay = min(2 * delay, AGENT_RETRY_MAX_S)


async def _stream(client, job_id: str, out) -> None:
    async for chunk in client.tail_job_logs(job_id):
        out.write(chunk)
        out.flush()


def follow(client, job_id: str, out=sys.stdout, poll_s: float = 2.0) -> str:
    """Print the job's logs as they come; return its terminal status (a string)."""
    try:
        asyncio.run(_stream(client, job_id, out))
    except KeyboardInterrupt:
        raise
    except Exception as e:  # websocket dropped: keep watching the status instead
        print(f"[submit] log stream lost ({_one_line(e)}); polling the job status", file=out)
    while True:
        status = str(client.get_job_status(job_id).value)
        if status in TERMINAL:
            return status
        time.sleep(poll_s)


def _commands(url: str, job_id: str, token: bool) -> list[str]:
    q = shlex.quote
    lines = [
        f"  follow: ray job logs --address {q(url)} --follow {q(job_id)}",
        f"  status: ray job status --address {q(url)} {q(job_id)}",
        f"  stop:   ray job stop --address {q(url)} {q(job_id)}",
    ]
    if token:
        lines.append("  (with RAY_AUTH_MODE=token set: the cluster uses token authentication)")
    return lines


def submit(args: argparse.Namespace, config_path: str | Path, overrides: list[str]) -> int:
    """Submit ``launch.py --config <config_path> <overrides>`` to the job server at
    ``args.submit``; follow it unless ``args.no_wait``. Returns the exit status:
    0 done (or submitted, with --no-wait), 1 failed / unreachable, 2 bad config or flags,
    130 interrupted (the job keeps running)."""
    url = args.submit.rstrip("/")
    err = sys.stderr
    try:
        cfg = load_config(config_path, overrides)  # refuse a bad config before uploading
        config_rel = config_in_project(config_path)
        env_vars = job_env(args.env)
    except ConfigError as e:
        print(f"config error: {e}", file=err)
        return 2
    if not Path(cfg.run.dir or "runs").is_absolute():
        print(
            "[submit] note: run.dir is relative, so the run directory is written inside the "
            "job's temporary working directory on the head node; pass run.dir=<absolute path "
            "on shared storage> to keep it",
            file=err,
        )
    job_id = args.job_id or default_job_id(cfg.run.name)
    pip = pip_wanted(args)
    renv = runtime_env(pip, env_vars)
    try:
        client = connect(url)
        token = bool(auth_token())
        what = f"pip installs {len(pip_packages())} packages" if pip else "no pip (--no-pip)"
        print(f"[submit] uploading {PROJECT_ROOT} as the job's working_dir; {what}", flush=True)
        from ray.exceptions import AuthenticationError

        try:
            job_id = submit_job(
                client,
                url,
                entrypoint=entrypoint(config_rel, overrides),
                submission_id=job_id,
                runtime_env=renv,
                metadata={"run_name": cfg.run.name, "config": config_rel},
            )
        except SubmitError:
            raise
        except AuthenticationError as e:
            raise SubmitError(_auth_message(url, e, auth_token())) from None
        except Exception as e:
            raise SubmitError(f"submitting to {url} failed: {_one_line(e)}") from None
    except SubmitError as e:
        print(f"error: {e}", file=err)
        return 1
    print(f"[submit] submitted job {job_id} to {url}", flush=True)
    if args.no_wait:
        print("[submit] not waiting (--no-wait); the job runs on. To watch it:")
        print("\n".join(_commands(url, job_id, token)), flush=True)
        return 0
    try:
        status = follow(client, job_id)
    except KeyboardInterrupt:
        print(f"\n[submit] detached from job {job_id}; it keeps running.", file=err)
        print("\n".join(_commands(url, job_id, token)), file=err)
        return 130
    except Exception as e:
        print(f"error: lost job {job_id} on {url}: {_one_line(e)}", file=err)
        print("\n".join(_commands(url, job_id, token)), file=err)
        return 1
    if status == "SUCCEEDED":
        print(f"[submit] job {job_id} succeeded", flush=True)
        return 0
    _report_failure(client, url, job_id, status)
    return 1


def _report_failure(client, url: str, job_id: str, status: str) -> None:
    """A job that ended otherwise than SUCCEEDED: its status, Ray's message and its last
    logs, on stderr."""
    err = sys.stderr
    message = ""
    try:
        # Ray appends the last logs to the message; they are printed below, in lines
        message = (client.get_job_info(job_id).message or "").split(", last available logs")[0]
        logs = _tail(client.get_job_logs(job_id))
    except Exception as e:
        logs = f"(logs unavailable: {_one_line(e)})"
    sys.stdout.flush()
    print(f"error: job {job_id} {status} on {url}", file=err)
    if message:
        print(f"  {_one_line(message)}", file=err)
    print(f"--- last {TAIL_LINES} lines of the logs of job {job_id} ---", file=err)
    print(logs, file=err)
    print(f"--- end of logs (all of them: ray job logs --address {url} {job_id}) ---", file=err)
