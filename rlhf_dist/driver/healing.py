"""What every group does with its pool: fan calls out, find lost workers, replace them."""

from __future__ import annotations

import ray

from rlhf_dist.dispatch import LOST, raise_if_broken
from rlhf_dist.driver.errors import WorkerUnplaceable
from rlhf_dist.driver.run_state import RestartBudget
from rlhf_dist.pools import Pool, PoolError


def dead_slots(pool: Pool, timeout_s: float = 30.0) -> list[int]:
    """Slots of ``pool`` whose actor is gone (an actor whose constructor raised is raised as
    ``WorkerFailedToStart``)."""
    try:
        return pool.probe(timeout_s)[0]
    except LOST as e:
        raise_if_broken(e, pool.name)
        raise


def unresponsive_slots(pool: Pool, timeout_s: float) -> list[int]:
    """Slots whose actor is gone or busy for more than ``timeout_s`` (e.g. a generator still
    waiting on a weight-sync group whose sender died)."""
    try:
        lost, silent = pool.probe(timeout_s)
    except LOST as e:
        raise_if_broken(e, pool.name)
        raise
    return sorted(lost + silent)


def replace_lost(pool: Pool, slots: list[int], budget: RestartBudget) -> list[int]:
    """Start new actors in place of lost ones, each paid from the restart budget."""
    for slot in slots:
        budget.spend(f"{pool.name} worker {slot}")
        try:
            pool.replace(slot)
        except PoolError as e:
            raise WorkerUnplaceable(
                f"{pool.name} worker {slot} was lost and cannot be replaced: {e}"
            ) from e
    return list(slots)


class PoolGroup:
    """A group over one pool of role actors (the learner and generator groups)."""

    pool: Pool

    @property
    def actors(self) -> list:
        return self.pool.actors

    def __len__(self) -> int:
        return len(self.pool)

    def worker_id(self, slot: int) -> int:
        """Which worker holds ``slot`` now: a replacement has another id."""
        return self.pool.worker_ids[slot]

    def holds(self, slot: int, worker_id: int) -> bool:
        """Whether ``slot`` still holds worker ``worker_id`` (not replaced, not removed)."""
        return slot < len(self.pool) and self.pool.worker_ids[slot] == worker_id

    def call(self, method: str, *args, **kwargs) -> list[ray.ObjectRef]:
        """The same call on every worker (refs, in slot order)."""
        return self.pool.call(method, *args, **kwargs)

    def dead(self) -> list[int]:
        return dead_slots(self.pool)

    def shutdown(self) -> None:
        self.pool.shutdown()
