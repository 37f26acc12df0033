"""Dealing by load on real Ray actors: a busy worker is handed nothing until it returns,
results come back in task order whoever computed them, and a worker that dies mid-task has its
task redone."""

import os
import time
from types import SimpleNamespace

import pytest
import ray

from rlhf_dist.dispatch import Job, deal
from rlhf_dist.driver.errors import WorkerFailedToStart


def make_worker_class():
    # defined inside a function so that Ray pickles it by value (tests/ is not importable there)
    class Worker:
        def __init__(self, delay: float, die_on: int = -1, broken: bool = False, gate=None):
            if broken:
                raise RuntimeError("cannot load the model")
            self.delay, self.die_on, self.gate = delay, die_on, gate

        def work(self, x: int) -> int:
            if x == self.die_on:
                os._exit(1)  # the process dies mid-task, as a killed worker does
            if self.gate is not None:
                ray.get(self.gate.wait.remote())
            time.sleep(self.delay)
            return x * x

    return ray.remote(num_cpus=0)(Worker)


def make_gate_class():
    class Gate:
        """Holds whoever waits on it until it is opened (or, so that a dealer that never opens
        it fails its asserts instead of hanging, for at most two minutes)."""

        def __init__(self):
            import asyncio

            self.opened = asyncio.Event()

        async def wait(self) -> None:
            import asyncio

            try:
                await asyncio.wait_for(self.opened.wait(), 120)
            except asyncio.TimeoutError:
                pass

        def open(self) -> None:
            self.opened.set()

    return ray.remote(num_cpus=0)(Gate)


def test_busy_worker_is_dealt_nothing_until_it_returns_and_results_keep_task_order(ray_cluster):
    Worker, Gate = make_worker_class(), make_gate_class()
    gate = Gate.remote()
    # worker 0 stays in its first task until the gate opens: when the last task is handed out
    pool = SimpleNamespace(name="toy", actors=[Worker.remote(0, gate=gate), Worker.remote(0)])
    tasks = list(range(20))
    job = Job(pool, tasks, lambda a, x: a.work.remote(x), heal=lambda lost, busy: [])
    seen = []

    def on_dispatch(name, slot, t):
        seen.append((name, slot, t))
        if t == tasks[-1]:
            gate.open.remote()

    deal(job, on_dispatch=on_dispatch)
    assert job.results == [x * x for x in tasks]
    # by load: worker 1 took tasks 1-19, each as it returned the one before; the busy worker 0
    # took none after its first; tasks were handed out in task order
    assert job.owner == [0] + [1] * 19
    assert seen == [("toy", 0, 0)] + [("toy", 1, t) for t in tasks[1:]]
    assert job.redone == 0


def test_lost_worker_is_healed_and_its_task_redone(ray_cluster):
    Worker = make_worker_class()
    # whichever worker is handed task 3 dies; its replacement does not
    pool = SimpleNamespace(
        name="toy", actors=[Worker.remote(0.05, die_on=3), Worker.remote(0.05, die_on=3)]
    )
    healed = []

    def heal(lost, busy):
        for slot in lost:
            pool.actors[slot] = Worker.remote(0.05)  # a replacement that does not die
            healed.append((slot, busy))
        return list(lost)

    job = Job(pool, list(range(10)), lambda a, x: a.work.remote(x), heal)
    deal(job)
    assert job.results == [x * x for x in range(10)]
    assert job.redone == 1 and len(healed) == 1
    assert -1 not in job.owner  # every task was computed by some worker (task 3 twice)


def test_heal_deferred_while_busy_runs_once_the_pool_is_idle(ray_cluster):
    """Generators' healing re-forms the sync group, so it waits until no call is in flight."""
    Worker = make_worker_class()
    pool = SimpleNamespace(name="toy", actors=[Worker.remote(0.01, die_on=0), Worker.remote(0.2)])
    calls = []

    def heal(lost, busy):
        calls.append((list(lost), busy))
        if busy:
            return []
        for slot in lost:
            pool.actors[slot] = Worker.remote(0.01)
        return list(lost)

    job = Job(pool, list(range(6)), lambda a, x: a.work.remote(x), heal)
    deal(job)
    assert job.results == [x * x for x in range(6)]
    assert calls[0] == ([0], True)  # task 0 died while worker 1 was busy: deferred
    assert calls[-1][1] is False  # healed once nothing was in flight


def test_worker_that_fails_to_start_is_raised_not_healed(ray_cluster):
    """A replacement would fail the same way: the error surfaces instead of a restart loop."""
    Worker = make_worker_class()
    pool = SimpleNamespace(name="toy", actors=[Worker.remote(0.01, broken=True)])
    healed = []
    job = Job(pool, [1, 2], lambda a, x: a.work.remote(x), lambda lost, busy: healed.append(lost))
    with pytest.raises(WorkerFailedToStart, match=r"toy: (?s:.*)cannot load the model") as e:
        deal(job)
    assert isinstance(e.value.__cause__, ray.exceptions.RayActorError)  # the worker's own error
    assert healed == []
