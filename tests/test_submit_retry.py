"""``launch.py --submit`` to a head whose job agent is not up yet retries for a while; nothing
else is retried. No Ray cluster: a stand-in client raises the error Ray's own client raises."""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

import pytest
import requests

from rlhf_dist import submit
from rlhf_dist.submit import AGENT_NOT_UP, SubmitError

ROOT = Path(__file__).resolve().parents[1]
URL = "http://head:8265"
JOB = {"entrypoint": "python launch.py", "submission_id": "job-1", "runtime_env": {}}


def _ray_error(status: int, text: str) -> Exception:
    """The exception Ray's JobSubmissionClient raises for an HTTP error answer, made by Ray."""
    from ray.dashboard.modules.dashboard_sdk import SubmissionClient

    r = requests.Response()
    r.status_code = status
    r._content = text.encode()
    try:
        SubmissionClient._raise_error(None, r)
    except Exception as e:
        return e
    raise AssertionError("_raise_error returned")


# What Ray's job head answers when it has no job agent to hand the job to (job_head.py).
NO_AGENT = (500, "No available agent to submit job, please try again later.")


class StandIn:
    """``submit_job`` raises ``errors`` in turn, then returns the submission id."""

    def __init__(self, *errors: Exception):
        self.errors = list(errors)
        self.calls: list[dict] = []

    def submit_job(self, **job):
        self.calls.append(job)
        if self.errors:
            raise self.errors.pop(0)
        return job["submission_id"]


class FakeTime:
    def __init__(self):
        self.now = 100.0
        self.slept: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, s: float) -> None:
        self.slept.append(s)
        self.now += s


def test_ray_still_says_what_the_retry_looks_for():
    spec = importlib.util.find_spec("ray")
    head = Path(spec.origin).parent / "dashboard" / "modules" / "job" / "job_head.py"
    assert NO_AGENT[1] in head.read_text()
    e = _ray_error(*NO_AGENT)
    assert isinstance(e, RuntimeError) and AGENT_NOT_UP in str(e)


def test_submit_retries_while_the_job_agent_is_not_up_then_submits(capsys):
    t = FakeTime()
    client = StandIn(*(_ray_error(*NO_AGENT) for _ in range(4)))
    got = submit.submit_job(client, URL, sleep=t.sleep, clock=t.clock, **JOB)
    assert got == "job-1"
    assert len(client.calls) == 5 and all(c == JOB for c in client.calls)
    assert t.slept == [1, 2, 4, 8]  # backoff
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 4
    assert all("job agent is not up yet" in x and "retrying" in x for x in lines)
    assert "(60 s left" in lines[0] and "(57 s left" in lines[2]


def test_submit_gives_up_when_the_job_agent_never_comes_up(capsys):
    t = FakeTime()
    client = StandIn(*(_ray_error(*NO_AGENT) for _ in range(100)))
    with pytest.raises(SubmitError) as info:
        submit.submit_job(client, URL, deadline_s=60, sleep=t.sleep, clock=t.clock, **JOB)
    msg = str(info.value)
    assert URL in msg and "never came up" in msg
    assert sum(t.slept) == pytest.approx(60)  # waited the whole minute, no longer
    assert max(t.slept) <= submit.AGENT_RETRY_MAX_S
    assert len(client.calls) == len(t.slept) + 1  # one last try at the deadline
    assert capsys.readouterr().out.count("retrying") == len(t.slept)


def test_submit_raises_any_other_error_at_once():
    t = FakeTime()
    for error in (
        _ray_error(500, "Traceback ...\nValueError: bad runtime_env"),
        ConnectionError("Failed to connect to Ray at address: http://head:8265."),
    ):
        client = StandIn(error, _ray_error(*NO_AGENT))
        with pytest.raises(type(error)) as info:
            submit.submit_job(client, URL, sleep=t.sleep, clock=t.clock, **JOB)
        assert info.value is error
        assert len(client.calls) == 1
    assert t.slept == []


def test_submit_retries_for_real_in_well_under_a_second():
    """The defaults (time.sleep, time.monotonic) with a short deadline: it really waits."""
    client = StandIn(*(_ray_error(*NO_AGENT) for _ in range(100)))
    with pytest.raises(SubmitError, match="never came up"):
        submit.submit_job(client, URL, deadline_s=0.05, **JOB)
    assert len(client.calls) >= 2


def test_submit_reports_an_agent_that_never_came_up(monkeypatch, capsys):
    parser = argparse.ArgumentParser()
    submit.add_arguments(parser)
    args = parser.parse_args(["--submit", URL, "--no-pip"])
    client = StandIn(*(_ray_error(*NO_AGENT) for _ in range(100)))
    monkeypatch.setattr(submit, "connect", lambda url: client)
    monkeypatch.setattr(submit, "AGENT_WAIT_S", 0.05)
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    rc = submit.submit(args, ROOT / "configs" / "smoke.yaml", ["run.dir=/tmp/never-written"])
    out = capsys.readouterr()
    assert rc == 1 and len(client.calls) >= 2
    assert "job agent is not up yet" in out.out and "submitted job" not in out.out
    assert f"error: the Ray head at {URL} " in out.err and "never came up" in out.err
