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


def check_cluster_resources(cfg: Config) -> None:
    """Refuse a job whose pools cannot fit the cluster, naming the first pool that does not."""
    have = ray.cluster_resources()
    used = {"CPU": 0.0, "GPU": 0.0}
    for name, (n, cpus, gpus) in pool_requests(cfg).items():
        for res, per in (("CPU", cpus), ("GPU", gpus)):
            used[res] += n * per
            if used[res] > have.get(res, 0.0) + 1e-9:
                raise PoolError(
                    f"{name}: {n} workers x {name}.num_{res.lower()}s={per} need "
                    f"{used[res]:g} {res} in total with the pools before it, but the cluster "
                    f"has {have.get(res, 0.0):g} {res}"
                )


class Pool:
    """``num_workers`` actors of one role class, one placement-group bundle each."""

    def __init__(
        self,
        name: str,
        role_cls: type,
        num_workers: int,
        num_cpus: float,
        num_gpus: float,
        make_args: Callable[[int], tuple[tuple, dict]],
        placement_timeout_s: float,
        strategy: str = "PACK",
    ):
        self.name = name
        bundle = {"CPU": num_cpus} | ({"GPU": num_gpus} if num_gpus > 0 else {})
        self.pg = placement_group([dict(bundle) for _ in range(num_workers)], strategy=strategy)
        ready, _ = ray.wait([self.pg.ready()], timeout=placement_timeout_s)
        if not ready:
            remove_placement_group(self.pg)
            raise PoolError(
                f"{name}: {num_workers} workers x {bundle} could not be placed within "
                f"{placement_timeout_s:g}s (ray.placement_timeout_s); cluster resources "
                f"available: {ray.available_resources()}"
            )
        remote_cls = ray.remote(role_cls)
        self.actors = []
        for i in range(num_workers):
            args, kwargs = make_args(i)
            self.actors.append(
                remote_cls.options(
                    num_cpus=num_cpus,
                    num_gpus=num_gpus,
                    scheduling_strategy=PlacementGroupSchedulingStrategy(
                        self.pg, placement_group_bundle_index=i
                    ),
                    # OMP/torch threads follow the CPUs a worker was given.
                    runtime_env={
                        "env_vars": {"OMP_NUM_THREADS": str(max(1, math.floor(num_cpus)))}
                    },
                ).remote(*args, **kwargs)
            )

    def __len__(self) -> int:
        return len(self.actors)

    def call(self, method: str, *args, **kwargs) -> list[ray.ObjectRef]:
        """The same call on every actor."""
        return [getattr(a, method).remote(*args, **kwargs) for a in self.actors]

    def node_ip(self, i: int) -> str:
        return ray.get(self.actors[i].__ray_call__.remote(_node_ip))

    def shutdown(self) -> None:
        for a in self.actors:
            ray.kill(a)
        remove_placement_group(self.pg)
