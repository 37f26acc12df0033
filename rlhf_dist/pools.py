"""Ray side of the system: pools of role actors placed with placement groups.

The role classes know nothing of Ray; ``ray.remote`` is applied here, from outside.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from rlhf_dist.config import Config


class PoolError(RuntimeError):
    """A pool could not be placed; the message names the pool and what is missing."""


def _node_ip(_self) -> str:
    return ray.util.get_node_ip_address()


def pool_requests(cfg: Config) -> dict[str, tuple[int, float, float]]:
    """Each pool's (workers, CPUs per worker, GPUs per worker), keyed by config section."""
    return {
        "learner": (cfg.learner.world_size, cfg.learner.num_cpus, cfg.learner.num_gpus),
        "rollout": (cfg.rollout.num_workers, cfg.rollout.num_cpus, cfg.rollout.num_gpus),
        "reward": (cfg.reward.num_workers, cfg.reward.num_cpus, cfg.reward.num_gpus),
        "reference": (cfg.reference.num_workers, cfg.reference.num_cpus, cfg.reference.num_gpus),
    }


def total_cpus(cfg: Config) -> float:
    return sum(n * c for n, c, _ in pool_requests(cfg).values())


def check_cluster_resources(cfg: Config, only: tuple[str, ...] | None = None) -> None:
    """Refuse a job whose pools cannot fit the cluster, naming the first pool that does not."""
    have = ray.cluster_resources()
    used = {"CPU": 0.0, "GPU": 0.0}
    for name, (n, cpus, gpus) in pool_requests(cfg).items():
        if only is not None and name not in only:
            continue
        for res, per in (("CPU", cpus), ("GPU", gpus)):
            used[res] += n * per
            if used[res] > have.get(res, 0.0) + 1e-9:
                raise PoolError(
                    f"{name}: {n} workers x {name}.num_{res.lower()}s={per} need "
                    f"{used[res]:g} {res} in total with the pools before it, but the cluster "
                    f"has {have.get(res, 0.0):g} {res}"
                )


class Pool:
    """Actors of one role class. Each actor has a placement group of its own (one bundle), so
    a pool can grow and shrink at runtime and a worker that cannot be placed fails clearly."""

    def __init__(
        self,
        name: str,
        role_cls: type,
        num_workers: int,
        num_cpus: float,
        num_gpus: float,
        make_args: Callable[[int], tuple[tuple, dict]],
        placement_timeout_s: float,
    ):
        self.name, self.num_cpus, self.num_gpus = name, num_cpus, num_gpus
        self.make_args, self.timeout = make_args, placement_timeout_s
        self.remote_cls = ray.remote(role_cls)
        self.actors: list = []
        self.pgs: list = []
        self.add(num_workers)

    def add(self, n: int) -> list:
        """Start ``n`` more actors; returns them."""
        bundle = {"CPU": self.num_cpus} | ({"GPU": self.num_gpus} if self.num_gpus > 0 else {})
        pgs = [placement_group([dict(bundle)]) for _ in range(n)]
        ready, _ = ray.wait([pg.ready() for pg in pgs], num_returns=n, timeout=self.timeout)
        if len(ready) < n:
            for pg in pgs:
                remove_placement_group(pg)
            raise PoolError(
                f"{self.name}: {n} more workers x {bundle} could not be placed within "
                f"{self.timeout:g}s (ray.placement_timeout_s); cluster resources "
                f"available: {ray.available_resources()}"
            )
        threads = str(max(1, math.floor(self.num_cpus)))
        new = []
        for pg in pgs:
            args, kwargs = self.make_args(len(self.actors))
            actor = self.remote_cls.options(
                num_cpus=self.num_cpus,
                num_gpus=self.num_gpus,
                scheduling_strategy=PlacementGroupSchedulingStrategy(pg),
                # OMP/torch threads follow the CPUs a worker was given.
                runtime_env={"env_vars": {"OMP_NUM_THREADS": threads}},
            ).remote(*args, **kwargs)
            self.actors.append(actor)
            self.pgs.append(pg)
            new.append(actor)
        return new

    def remove(self, i: int) -> None:
        """Stop actor ``i`` and free its resources."""
        actor, pg = self.actors.pop(i), self.pgs.pop(i)
        ray.kill(actor)
        remove_placement_group(pg)

    def __len__(self) -> int:
        return len(self.actors)

    def call(self, method: str, *args, **kwargs) -> list[ray.ObjectRef]:
        """The same call on every actor."""
        return [getattr(a, method).remote(*args, **kwargs) for a in self.actors]

    def node_ip(self, i: int) -> str:
        return ray.get(self.actors[i].__ray_call__.remote(_node_ip))

    def shutdown(self) -> None:
        while self.actors:
            self.remove(len(self.actors) - 1)
