"""Dealing work to pools by load, and redoing the work of workers that are lost.

A *job* is a list of tasks for one pool. Each worker has one task in flight and takes the next
one from the queue when it returns, so a slow or busy worker takes fewer. When a worker is lost
(its process killed, its node gone) its task goes back to the front of the queue and the job's
``heal`` decides what happens to the worker's slot: replaced at once (scorers), or later, when
none of the job's calls is in flight (generators, whose replacement re-forms the weight-sync
group with every generator; the caller runs one generator job at a time). Results come back in task order, whoever computed them, so a lost
worker changes nothing but the time.
"""

from __future__ import annotations

import hashlib
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import ray

from rlhf_dist.driver.errors import WorkerFailedToStart

# A worker that is gone: its actor died (killed, crashed, node lost) or its result was on a
# node that went away. An exception raised by the role's own code (RayTaskError) is not one.
LOST = (ray.exceptions.RayActorError, ray.exceptions.ObjectLostError)


def failed_to_start(e: BaseException) -> bool:
    """An actor whose constructor raised is broken, not lost: a replacement would fail the
    same way, so the error is raised (``WorkerFailedToStart``) instead of healed."""
    return bool(getattr(e, "actor_init_failed", False))


def raise_if_broken(e: BaseException, pool: str) -> None:
    """Raise ``WorkerFailedToStart`` for an actor whose constructor raised (``e`` a lost
    worker's error); return for one that is merely lost."""
    if failed_to_start(e):
        raise WorkerFailedToStart(f"{pool}: {e}") from e


def derive_seed(*parts) -> int:
    """A seed that depends only on ``parts`` (Python's ``hash`` is salted per process)."""
    return int.from_bytes(hashlib.blake2b(repr(parts).encode(), digest_size=4).digest(), "little")


def split_ranges(n: int, size: int) -> list[range]:
    """Contiguous ranges of ``size`` (the last may be shorter) covering ``range(n)``."""
    return [range(a, min(a + size, n)) for a in range(0, n, size)]


class Chunk(NamedTuple):
    """One ``generate`` call's work: prompt indices and the seed they are sampled with."""

    prompt_ids: list[int]
    seed: int


def chunk_plan(prompt_ids: list[int], size: int, *seed_parts) -> list[Chunk]:
    """``prompt_ids`` cut into chunks of ``size``; chunk ``c`` is seeded by ``(*seed_parts, c)``,
    so a sample does not depend on which worker takes its chunk, or how many there are."""
    return [
        Chunk([prompt_ids[i] for i in part], derive_seed(*seed_parts, c))
        for c, part in enumerate(split_ranges(len(prompt_ids), size))
    ]


@dataclass
class Job:
    pool: Any  # rlhf_dist.pools.Pool
    tasks: list
    submit: Callable[[Any, Any], ray.ObjectRef]  # (actor, task) -> ObjectRef
    # (lost slots, other calls of this job in flight) -> slots that can take work again
    heal: Callable[[list[int], bool], list[int]]
    results: list = field(init=False)
    owner: list[int] = field(init=False)  # slot that computed each task
    redone: int = field(default=0, init=False)  # tasks resubmitted after a loss
    lost: list[int] = field(default_factory=list, init=False)  # slots awaiting healing

    def __post_init__(self):
        self.results = [None] * len(self.tasks)
        self.owner = [-1] * len(self.tasks)

    def critical_path(self) -> float:
        """The busiest worker's compute: the sum of ``compute_s`` over the tasks it returned."""
        per_slot: dict[int, float] = {}
        for slot, r in zip(self.owner, self.results):
            c = r["compute_s"] if isinstance(r, dict) else r.compute_s
            per_slot[slot] = per_slot.get(slot, 0.0) + c
        return max(per_slot.values(), default=0.0)


def deal(*jobs: Job, on_dispatch: Callable[[str, int, int], None] | None = None) -> None:
    """Run every job's tasks concurrently on their pools; fills ``job.results``/``job.owner``.
    ``on_dispatch(pool name, slot, task index)`` runs after each submission (fault tests)."""
    inflight: dict[ray.ObjectRef, tuple[Job, int, int]] = {}
    queues = {id(j): deque(range(len(j.tasks))) for j in jobs}
    idle = {id(j): deque(range(len(j.pool.actors))) for j in jobs}

    def busy(job: Job) -> bool:
        return any(j is job for j, _, _ in inflight.values())

    while inflight or any(queues.values()):
        for job in jobs:
            q, free = queues[id(job)], idle[id(job)]
            if q and not free and job.lost and not busy(job):
                free.extend(job.heal(job.lost, False))  # every slot is lost: heal now
                job.lost = []
            while q and free:
                slot, t = free.popleft(), q.popleft()
                inflight[job.submit(job.pool.actors[slot], job.tasks[t])] = (job, slot, t)
                if on_dispatch is not None:
                    on_dispatch(job.pool.name, slot, t)
        if not inflight:
            raise RuntimeError("dispatch: work is queued but no worker can take it")
        [ref], _ = ray.wait(list(inflight), num_returns=1)
        job, slot, t = inflight.pop(ref)
        try:
            job.results[t] = ray.get(ref)
        except LOST as e:
            raise_if_broken(e, job.pool.name)
            queues[id(job)].appendleft(t)
            job.redone += 1
            job.lost.append(slot)
            healed = job.heal(job.lost, busy(job))
            job.lost = [s for s in job.lost if s not in healed]
            idle[id(job)].extend(healed)
            continue
        job.owner[t] = slot
        idle[id(job)].append(slot)
    for job in jobs:
        if job.lost:  # nothing in flight now: make the pool whole before anyone uses it again
            job.heal(job.lost, False)
            job.lost = []
