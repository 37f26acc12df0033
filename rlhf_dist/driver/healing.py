"""What every group does with its pool: fan calls out, find lost workers, replace them."""

from __future__ import annotations

import ray

from rlhf_dist.dispatch import LOST, failed_to_start
from rlhf_dist.driver.errors import WorkerUnplaceable
from rlhf_dist.driver.run_state import RestartBudget
from rlhf_dist.pools import Pool, PoolError


def _noop(_self) -> None:
    return None


def _probe(pool: Pool, timeout_s: float) -> tuple[list[int], list[int]]:
    """A no-op call on each actor: the slots whose actor is gone, and those that did not
    answer within ``timeout_s`` (idle actors answer at once, busy ones when their call ends)."""
    refs = [a.__ray_call__.remote(_noop) for a in pool.actors]
    ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
    lost, silent = [], []
    for i, ref in enumerate(refs):
        try:
            ray.get(ref, timeout=0)
        except LOST as e:
            if failed_to_start(e):
                raise
            lost.append(i)
        except ray.exceptions.GetTimeoutError:
            silent.append(i)
    return lost, silent


def dead_slots(pool: Pool, timeout_s: float = 30.0) -> list[int]:
    """Slots of ``pool`` whose actor is gone."""
    return _probe(pool, timeout_s)[0]


def unresponsive_slots(pool: Pool, timeout_s: float) -> list[int]:
    """Slots whose actor is gone or busy for more than ``timeout_s`` (e.g. a generator still
    waiting on a weight-sync group whose sender died)."""
    lost, silent = _probe(pool, timeout_s)
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

    def call(self, method: str, *args, **kwargs) -> list[ray.ObjectRef]:
        """The same call on every worker (refs, in slot order)."""
        return self.pool.call(method, *args, **kwargs)

    def dead(self) -> list[int]:
        return dead_slots(self.pool)

    def shutdown(self) -> None:
        self.pool.shutdown()
