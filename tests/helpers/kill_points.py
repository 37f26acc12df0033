"""Kill points: a worker that is certainly inside a given call when the test kills it.

A kill point is a directory on this machine, shared by the test and the workers. The test
*arms* it; the next trapped call (in any process, after ``skip`` trapped calls pass) claims
it under a lock, writes its PID to ``caught`` and holds: it sleeps until it is killed, at
most ``HOLD_S``, then raises, so that a test whose kill never comes fails instead of
training on. Exactly one call is caught per arming, and the test learns which process it
is in before it kills: the kill lands inside that call, not before or after it.

A call is trapped in one of two ways:
- ``KillPoint.arm(actors, "model.generate")`` first wraps an attribute of each live Ray
  actor's role object (through ``actor.__ray_call__``, queued behind the actor's current
  call), e.g. a generator's HF model's ``generate`` or a reward scorer's ``_score_fns``; a
  ``module:function`` path (``"package.module:function"``) wraps a module function in the
  actors' processes. Actors started later (replacements) are not trapped.
- ``reward`` is a reward function (``reward.function=kill_points:reward``, with
  ``tests/helpers`` on ``PYTHONPATH``) that is trapped when the environment variable
  ``KILL_POINT_DIR`` names an armed kill point: for runs the test cannot reach into, such as
  a ``launch.py`` subprocess (arm it before the run with ``skip``).
"""

from __future__ import annotations

import fcntl
import json
import os
import sys
import time
from pathlib import Path

HOLD_S = 60.0  # how long a caught call waits to be killed before it fails the run
ENV = "KILL_POINT_DIR"


def spring(directory: str) -> None:
    """At the start of a trapped call: if the kill point is armed and no skips are left,
    claim it, write this process's PID to ``caught`` and hold until killed."""
    d = Path(directory)
    armed = d / "armed"
    if not armed.exists():
        return
    with open(d / "lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not armed.exists():
            return
        skip = int(armed.read_text())
        if skip:
            armed.write_text(str(skip - 1))
            return
        armed.unlink()
        tmp = d / "caught.tmp"
        tmp.write_text(json.dumps({"pid": os.getpid()}))
        tmp.rename(d / "caught")
    time.sleep(HOLD_S)
    raise RuntimeError(
        f"kill point {directory}: held {HOLD_S:g}s in pid {os.getpid()}, never killed"
    )


def _wrap(target, name: str, directory: str) -> None:
    inner = getattr(target, name)
    if getattr(inner, "kill_point", None) == directory:
        return  # trapped already

    def trapped(*args, **kwargs):
        spring(directory)
        return inner(*args, **kwargs)

    trapped.kill_point = directory
    setattr(target, name, trapped)


def _install(role, path: str, directory: str) -> dict:
    """Runs inside the actor: trap ``path`` and say where this process is."""
    import importlib

    import ray

    if ":" in path:
        module, name = path.split(":")
        _wrap(importlib.import_module(module), name, directory)
    else:
        *parents, name = path.split(".")
        target = role
        for part in parents:
            target = getattr(target, part)
        _wrap(target, name, directory)
    return {"pid": os.getpid(), "node_id": ray.get_runtime_context().get_node_id()}


class KillPoint:
    """The test's side of a kill point (see the module docstring)."""

    def __init__(self, directory: Path):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.actors: dict[int, tuple] = {}  # pid -> (actor handle, node id) of trapped actors

    def arm(self, actors=(), path: str = "", skip: int = 0) -> None:
        """Trap ``path`` in ``actors`` (if any), then catch the trapped call that comes after
        ``skip`` others."""
        if actors:
            import ray
            from ray import cloudpickle

            # The workers need not import this module (tests/helpers may not be on their
            # path): the installer travels by value.
            here = sys.modules[__name__]
            cloudpickle.register_pickle_by_value(here)
            try:
                where = ray.get(
                    [a.__ray_call__.remote(_install, path, str(self.dir)) for a in actors]
                )
            finally:
                cloudpickle.unregister_pickle_by_value(here)
            for actor, w in zip(actors, where):
                self.actors[w["pid"]] = (actor, w["node_id"])
        (self.dir / "caught").unlink(missing_ok=True)
        tmp = self.dir / "armed.tmp"
        tmp.write_text(str(skip))
        tmp.rename(self.dir / "armed")

    def caught(self, timeout_s: float = 120.0, alive=lambda: True) -> int:
        """The PID of the process held inside the trapped call: waits until one is (for at
        most ``timeout_s``, and only while ``alive()``, e.g. while the run goes on)."""
        path = self.dir / "caught"
        deadline = time.monotonic() + timeout_s
        while not path.exists():
            assert alive(), f"kill point {self.dir}: the run ended before a call was caught"
            assert time.monotonic() < deadline, f"kill point {self.dir}: no call was caught"
            time.sleep(0.05)
        return json.loads(path.read_text())["pid"]


def reward(prompts: list[str], responses: list[str]) -> list[float]:
    """The built-in tiny task's reward, trapped when ``KILL_POINT_DIR`` names a kill point."""
    from rlhf_dist.tasks.tiny import reward as tiny_reward

    if os.environ.get(ENV):
        spring(os.environ[ENV])
    return tiny_reward(prompts, responses)
